/*
 * The guest that proves its memory and its vCPU (x86-64, long mode, identity-mapped by the VMM).
 *
 * At entry it counts the entry (state 0x30: a vCPU restored from its saved state never
 * comes back here, so the count stays 1 across live updates; a cold-started vCPU makes it 2)
 * and chooses a secret from the TSC that lives only in r10 from then on (a cold start
 * chooses another: the old one is not in memory for it to reload, only its mirror is).
 *
 * Then it walks every page of its data region forever. Each step takes the next page, adds
 * one to the page's counter (word 0), stamps the page with its own address xor a magic (word
 * 1: the fill the VMM's layout gave words 1 to 511 of every page), adds the new counter to a
 * running checksum, mirrors r10 to memory (state 0x38) and counts the step. Every 4096 steps
 * it reads the TSC into a ring of 64 timestamps and reports the step count with
 * `out %eax, $0xe9`: that exit is a point where memory is consistent, and where the VMM
 * pauses it. (The guest does not write the fill itself: under this host's nested KVM a store
 * costs about a microsecond, and filling 1 GiB would take a minute.)
 *
 * What a checker verifies from memory alone (liveupdate.vmm.guest.verify): the counters are
 * exactly what `steps` steps of the walk leave; the checksum is the sum of c(c+1)/2 over the
 * counters; every other byte of a data page is its fill; the state page holds its fields and
 * zeros; the entry count is 1 and the mirror is the saved r10 (the checker reads that from the
 * saved vCPU state). A lost, stale, zeroed, flipped or misplaced byte breaks them.
 *
 * State page (0x1000): step 0x00, checksum 0x08, current page 0x10, ring index 0x18,
 * data start 0x20, data end 0x28, entries 0x30, r10 mirror 0x38, ring 0x100 (64 x u64).
 * Build: python -m liveupdate.vmm.guest (GNU as + objcopy); the bytes are checked in, and a
 * test rebuilds.
 */
        .code64
        .text
        .globl _start
_start:
        movabs  $0x1000, %r8
        incq    0x30(%r8)
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        or      $1, %rax
        mov     %rax, %r10
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
        mov     %r10, 0x38(%r8)
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
