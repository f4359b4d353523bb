/* A BIOS boot sector that proves a VM booted from a registry disk.
 *
 * It prints a banner and then the first bytes of the disk's second sector
 * (LBA 1) to the first serial port, and writes a new value into that
 * sector. A fresh, ephemeral disk therefore always prints the pristine
 * sector; a disk whose writes persisted would print the new value.
 * Then, if the third sector (LBA 2) starts with 'P', it powers the machine
 * off through the ACPI PM1a control port of QEMU's pc machine; otherwise it
 * halts and keeps running until it is stopped.
 *
 * Assembled by the build (see guest/CMakeLists.txt) into a flat 512-byte
 * image that ends in the 0x55 0xAA boot signature.
 */
        .code16
        .globl _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        mov     %dl, boot_drive

        mov     $banner, %si
        call    puts

        /* Read LBA 1 (CHS 0/0/2) into 0x8000. */
        mov     $0x0201, %ax          /* AH=2 read, AL=1 sector */
        mov     $0x0002, %cx          /* cylinder 0, sector 2 */
        xor     %dh, %dh              /* head 0 */
        mov     boot_drive, %dl
        mov     $0x8000, %bx
        int     $0x13
        jc      disk_error

        mov     $sector_label, %si
        call    puts
        mov     $0x8000, %si
        movb    $0, 0x8000+31         /* print at most 31 bytes */
        call    puts
        mov     $newline, %si
        call    puts

        /* Overwrite the sector: the next boot must not see this if writes
         * are ephemeral. */
        mov     $written, %si
        mov     $0x8000, %di
        mov     $16, %cx
        rep movsb
        mov     $0x0301, %ax          /* AH=3 write, AL=1 sector */
        mov     $0x0002, %cx
        xor     %dh, %dh
        mov     boot_drive, %dl
        mov     $0x8000, %bx
        int     $0x13
        jc      disk_error

        mov     $done, %si
        call    puts

        /* Read LBA 2 (CHS 0/0/3): 'P' at its start asks for power-off. */
        mov     $0x0201, %ax
        mov     $0x0003, %cx
        xor     %dh, %dh
        mov     boot_drive, %dl
        mov     $0x8000, %bx
        int     $0x13
        jc      halt
        cmpb    $'P', 0x8000
        jne     halt
        mov     $poweroff, %si
        call    puts
        mov     $0x604, %dx           /* PM1a_CNT: SLP_TYP 0 | SLP_EN */
        mov     $0x2000, %ax
        out     %ax, %dx
        jmp     halt

disk_error:
        mov     $error_msg, %si
        call    puts
halt:
        hlt
        jmp     halt

/* Prints the NUL-terminated string at %si to COM1. */
puts:
        mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret

boot_drive:   .byte 0
banner:       .asciz "REGDISK-GUEST-BOOTED\r\n"
sector_label: .asciz "sector1: "
newline:      .asciz "\r\n"
written:      .asciz "WRITTEN-BY-GUEST"
done:         .asciz "REGDISK-GUEST-DONE\r\n"
error_msg:    .asciz "REGDISK-GUEST-DISK-ERROR\r\n"
poweroff:     .asciz "REGDISK-GUEST-POWEROFF\r\n"

        .org    510
        .word   0xaa55
