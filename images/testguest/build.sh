#!/usr/bin/env bash
# Builds the test guest: 32-bit freestanding code without SSE, in an ELF64 container with a PVH note
# (our VMM's loader and QEMU both take ELF64). Usage: build.sh OUTDIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
CFLAGS=(-m32 -march=i686 -O2 -ffreestanding -fno-builtin -nostdlib -fno-pic -fno-pie
        -fno-stack-protector -mgeneral-regs-only -fno-asynchronous-unwind-tables
        -fcf-protection=none -Wall -Wextra -Werror -Wno-unused-parameter)
gcc "${CFLAGS[@]}" -c "$here/start.S" -o "$out/start.o"
gcc "${CFLAGS[@]}" -c "$here/guest.c" -o "$out/guest.o"
ld -m elf_i386 -nostdlib -static --no-warn-rwx-segments -T "$here/guest.ld" --build-id=none \
   "$out/start.o" "$out/guest.o" -o "$out/testguest32.elf"
objcopy -O elf64-x86-64 "$out/testguest32.elf" "$out/testguest.elf"
# Ring-0 SSE kills the VM on nested-PVM hosts: refuse to ship any xmm/ymm use.
if objdump -d "$out/testguest.elf" -M i386 | grep -Eq '%[xy]mm[0-9]'; then
    echo "testguest: SSE/AVX register use found in the disassembly" >&2
    exit 1
fi
