/*
 * The guest that proves its memory (x86-64, long mode, identity-mapped by the VMM).
 *
 * It walks every page of its data region forever. Each step takes the next page, adds one
 * to the page's counter (word 0), stamps the page with its own address xor a magic (word 1),
 * adds the new counter to a running checksum and counts the step. Every 4096 steps it reads
 * the TSC into a ring of 64 timestamps and reports the step count with `out %eax, $0xe9`:
 * that exit is a point where memory is consistent, and where the VMM pauses it.
 *
 * Invariants the VMM checks: the counters sum to the step count; the checksum is the sum of
 * c(c+1)/2 over the counters; every touched page carries its own tag. A lost, stale, zeroed
 * or misplaced page breaks them.
 *
 * State page (0x1000): step 0x00, checksum 0x08, current page 0x10, ring index 0x18,
 * data start 0x20, data end 0x28, ring 0x100 (64 x u64). Build: python -m
 * liveupdate.vmm.guest (GNU as + objcopy); the bytes are checked in, and a test rebuilds.
 */
        .code64
        .text
        .globl _start
_start:
        movabs  $0x1000, %r8
        mov     0x20(%r8), %rdi
        mov     0x28(%r8), %rsi
        movabs  $0x4c55475545535421, %r9
        mov     0x10(%r8), %rbx
        test    %rbx, %rbx
        jnz     step
        mov     %rdi, %rbx
step:
        cmp     %rsi, %rbx
        jb      1f
        mov     %rdi, %rbx
1:
        mov     (%rbx), %rax
        inc     %rax
        mov     %rax, (%rbx)
        mov     %rbx, %rcx
        xor     %r9, %rcx
        mov     %rcx, 8(%rbx)
        add     %rax, 0x08(%r8)
        incq    0x00(%r8)
        add     $4096, %rbx
        mov     %rbx, 0x10(%r8)
        testq   $0xfff, 0x00(%r8)
        jnz     step
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     0x18(%r8), %rcx
        and     $63, %rcx
        mov     %rax, 0x100(%r8,%rcx,8)
        incq    0x18(%r8)
        mov     0x00(%r8), %eax
        out     %eax, $0xe9
        jmp     step
