/*
 * The guest that owns a NIC (x86-64, long mode, identity-mapped by the VMM; issue #25).
 *
 * The VMM gives it a receive ring and buffers in its own memory (state 0x840: ring address,
 * 0x848: entries, a power of two; 0x850: buffers, 64 bytes each) and a CRC-32 table at
 * 0x6000 (zlib's polynomial, as firmware gives a guest tables). At entry, and whenever the
 * VMM asks (0x860 non-zero: the device was reset), the guest posts every buffer itself --
 * each descriptor {buffer, 64, 0, 0}: the device owns a descriptor whose done bit is clear --
 * and starts again at descriptor 0.
 *
 * Then it polls the next descriptor. For each one the device marked done it checks the packet
 * itself -- 60 bytes, magic "LUPK", CRC-32 of the first 56 bytes, the payload being its
 * sequence number four times -- and counts it: received, or bad; a sequence number above the
 * one expected adds the numbers skipped to the gaps; one below counts as out of order. Then
 * it gives the descriptor back (clears done) and moves on. Every 256 packets, and every 4096
 * empty polls, it stamps the TSC into the ring of 64 timestamps, adds 4096 to its step count
 * and reports with `out %eax, $0xe9` -- a consistent point where the VMM may pause it.
 *
 * State page (0x1000): steps 0x00, ring index 0x18, entries 0x30, TSC ring 0x100 (as the
 * memory-walking guest); rx index 0x800, expected 0x808, received 0x810, bad 0x818, gaps
 * 0x820, out of order 0x828, first seen 0x830, polls 0x838, ring 0x840, entries 0x848,
 * buffers 0x850, postings 0x858, repost request 0x860, last sequence number 0x870.
 * Build: python -m liveupdate.vmm.guest_nic (GNU as + objcopy); the bytes are checked in.
 */
        .code64
        .text
        .globl _start
_start:
        movabs  $0x1000, %r8
        incq    0x30(%r8)
        movabs  $0x6000, %r11
repost:
        mov     0x840(%r8), %rdi
        mov     0x848(%r8), %rcx
        mov     0x850(%r8), %rsi
1:
        mov     %rsi, (%rdi)
        movq    $64, 8(%rdi)
        add     $64, %rsi
        add     $16, %rdi
        dec     %rcx
        jnz     1b
        movq    $0, 0x800(%r8)
        movq    $0, 0x860(%r8)
        incq    0x858(%r8)
poll:
        cmpq    $0, 0x860(%r8)
        jne     repost
        mov     0x800(%r8), %rdi
        shl     $4, %rdi
        add     0x840(%r8), %rdi
        testb   $1, 12(%rdi)
        jnz     packet
        incq    0x838(%r8)
        testq   $0xfff, 0x838(%r8)
        jnz     poll
        jmp     exit_point
packet:
        mov     (%rdi), %rbx
        movzwl  10(%rdi), %eax
        cmp     $60, %eax
        jne     bad
        cmpl    $0x4b50554c, (%rbx)
        jne     bad
        mov     $0xffffffff, %eax
        xor     %ecx, %ecx
2:
        movzbl  (%rbx,%rcx), %edx
        xor     %eax, %edx
        movzbl  %dl, %edx
        shr     $8, %eax
        xor     (%r11,%rdx,4), %eax
        inc     %ecx
        cmp     $56, %ecx
        jb      2b
        not     %eax
        cmp     56(%rbx), %eax
        jne     bad
        mov     8(%rbx), %rax
        cmp     %rax, 24(%rbx)
        jne     bad
        cmp     %rax, 32(%rbx)
        jne     bad
        cmp     %rax, 40(%rbx)
        jne     bad
        cmp     %rax, 48(%rbx)
        jne     bad
        cmpq    $0, 0x830(%r8)
        jne     3f
        mov     %rax, 0x808(%r8)
        movq    $1, 0x830(%r8)
3:
        mov     0x808(%r8), %rdx
        cmp     %rdx, %rax
        jae     4f
        incq    0x828(%r8)
        jmp     5f
4:
        mov     %rax, %rcx
        sub     %rdx, %rcx
        add     %rcx, 0x820(%r8)
        lea     1(%rax), %rdx
        mov     %rdx, 0x808(%r8)
5:
        mov     %rax, 0x870(%r8)
        incq    0x810(%r8)
        jmp     give_back
bad:
        incq    0x818(%r8)
give_back:
        movq    $64, 8(%rdi)
        mov     0x800(%r8), %rax
        inc     %rax
        mov     0x848(%r8), %rcx
        dec     %rcx
        and     %rcx, %rax
        mov     %rax, 0x800(%r8)
        testq   $0xff, 0x810(%r8)
        jnz     poll
exit_point:
        addq    $4096, 0x00(%r8)
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     0x18(%r8), %rcx
        and     $63, %rcx
        mov     %rax, 0x100(%r8,%rcx,8)
        incq    0x18(%r8)
        mov     0x00(%r8), %eax
        out     %eax, $0xe9
        jmp     poll
