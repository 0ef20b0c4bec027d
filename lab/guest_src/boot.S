/*
 * Entry, descriptor tables and interrupt stubs of the lab guest.
 *
 * The guest never returns from an interrupt with iret: every handler resets
 * the stack and jumps back to the idle loop (KVM on nested hosts stopped the
 * guest with an emulation failure at iret). All state lives in C globals.
 */
	.set MB_MAGIC, 0x1BADB002
	.set MB_FLAGS, 0x00000003	/* page-aligned modules, memory information */
	.set MB_CHECKSUM, -(MB_MAGIC + MB_FLAGS)

	.set CODE_SEL, 0x08
	.set DATA_SEL, 0x10

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long MB_CHECKSUM

	.text
	.globl _start
_start:
	cli
	cld
	/* The loader's GDT may sit in ROM: load our own before anything else. */
	lgdt gdt_desc
	ljmp $CODE_SEL, $1f
1:	movw $DATA_SEL, %cx
	movw %cx, %ds
	movw %cx, %es
	movw %cx, %fs
	movw %cx, %gs
	movw %cx, %ss
	movl $stack_top, %esp
	pushl %ebx		/* multiboot information */
	pushl %eax		/* multiboot magic */
	call kmain		/* returns once set up; then the idle loop runs */

	.globl idle_loop
idle_loop:
	movl $stack_top, %esp
2:	sti			/* sti's one-instruction shadow makes sti; hlt atomic */
	hlt
	jmp 2b

	/* PIT tick (IRQ0). tick() acknowledges the PIC. */
	.globl irq_timer
irq_timer:
	movl $stack_top, %esp
	call tick
	jmp idle_loop

	/* Any other interrupt: acknowledge both PICs and go back to idle. */
	.globl irq_other
irq_other:
	movl $stack_top, %esp
	movb $0x20, %al
	outb %al, $0xa0
	outb %al, $0x20
	jmp idle_loop

	/* CPU exceptions: report the vector and halt. */
	.macro EXC n
	.globl exc_\n
exc_\n:
	movl $\n, %eax
	jmp exc_common
	.endm
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	EXC \n
	.endr

exc_common:
	movl $stack_top, %esp
	pushl %eax
	call fault		/* never returns */
3:	cli
	hlt
	jmp 3b

	.section .rodata
	.globl exc_table
	.align 4
exc_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long exc_\n
	.endr

	.data
	.align 8
gdt:
	.quad 0x0000000000000000	/* null */
	.quad 0x00cf9a000000ffff	/* 0x08: flat 32-bit code, ring 0 */
	.quad 0x00cf92000000ffff	/* 0x10: flat 32-bit data, ring 0 */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.bss
	.align 4096
	.align 16
stack_bottom:
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
