/* a multiboot (a.out kludge) guest for QEMU: long mode on 2 MiB pages, walks RAM forever */
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x00010000
.set PML4, 0x200000
.set PDPT, 0x201000
.set PD, 0x202000
.set NPD, 16                 /* 16 GiB mapped */
.set COUNTER, 0x500
.text
.code32
.globl _start
_start:
    jmp entry
.align 4
mbh:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .long mbh, _start, 0, 0, entry
entry:
    cli
    mov $0x90000, %esp
    /* zero PML4 and PDPT */
    xor %eax, %eax
    mov $PML4, %edi
    mov $(2 * 1024), %ecx
    rep stosl
    movl $(PDPT | 3), PML4
    mov $PDPT, %edi
    mov $PD, %eax
    mov $NPD, %ecx
1:  mov %eax, %edx
    or $3, %edx
    mov %edx, (%edi)
    movl $0, 4(%edi)
    add $8, %edi
    add $0x1000, %eax
    loop 1b
    /* PD entries: n << 21 | 0x83 for n in 0 .. NPD*512 */
    mov $PD, %edi
    xor %ebx, %ebx
2:  mov %ebx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi)
    mov %ebx, %eax
    shr $11, %eax
    mov %eax, 4(%edi)
    add $8, %edi
    inc %ebx
    cmp $(NPD * 512), %ebx
    jne 2b
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $PML4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt gdtr
    ljmp $8, $long
.code64
long:
    mov $0x90000, %rsp
    movq $0, COUNTER
walk:
    mov $0x400000, %rdi
    mov $LOW_END, %rsi
    call touch
    mov $HIGH_START, %rdi
    mov $HIGH_END, %rsi
    call touch
    incq COUNTER
    jmp walk
touch:                      /* every page of [rdi, rsi): its first qword += 1 */
    cmp %rsi, %rdi
    jae 3f
    addq $1, (%rdi)
    add $4096, %rdi
    jmp touch
3:  ret
.align 8
gdt:
    .quad 0
    .quad 0x00209A0000000000
gdtr:
    .word gdtr - gdt - 1
    .long gdt
