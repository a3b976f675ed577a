#!/usr/bin/env python3
"""Writes the seed corpus of the virtio_devices fuzz target (vmm/fuzz/seeds/virtio_devices/):
one well-formed exchange per device, so fuzzing starts from requests each device serves.

Input format (fuzz_targets/virtio_devices.rs): device (% 5: rng, balloon, mem, net, vsock; bits
6-7: virtio-mem's requested blocks), accepted features (one bit per byte lane), queue size
(1 << (b % 9)), kicks (four 2-bit queue indexes), then the guest's memory from address 0. Queue
i's rings are at i * 0x2000: available ring +0x40, descriptors +0x300, used ring +0x1300."""
import os
import struct

MEM = 1 << 16
NEXT, WRITE = 1, 2
HOTPLUG_START = 4 << 30  # memory_hotplug_start(64 KiB): the end of the MMIO hole


def image(queues, buffers):
    """queues: {index: [descriptor chains, each a list of (addr, len, flags)]};
    buffers: {addr: bytes}."""
    m = bytearray(MEM)
    for qi, chains in queues.items():
        base = qi * 0x2000
        heads, d = [], 0
        for chain in chains:
            heads.append(d)
            for k, (addr, length, flags) in enumerate(chain):
                nxt = d + 1 if k + 1 < len(chain) else 0
                fl = flags | (NEXT if k + 1 < len(chain) else 0)
                struct.pack_into("<QIHH", m, base + 0x300 + 16 * d, addr, length, fl, nxt)
                d += 1
        struct.pack_into("<HH", m, base + 0x40, 0, len(heads))
        for i, h in enumerate(heads):
            struct.pack_into("<H", m, base + 0x44 + 2 * i, h)
    for addr, data in buffers.items():
        m[addr:addr + len(data)] = data
    return bytes(m).rstrip(b"\0")


def seed(device, kicks_queue, queues, buffers, features=0xFF, size_sel=4):
    kicks = kicks_queue | kicks_queue << 2 | kicks_queue << 4 | kicks_queue << 6
    return bytes([device, features, size_sel, kicks]) + image(queues, buffers)


def vsock_header(op, src_port, dst_port, length=0):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, 65536, 0)


seeds = {
    "rng-fill": seed(0, 0, {0: [[(0x6000, 64, WRITE)]]}, {}),
    "balloon-inflate": seed(1, 0, {0: [[(0x6000, 8, 0)]]}, {0x6000: struct.pack("<II", 6, 7)}),
    "balloon-deflate": seed(1, 1, {1: [[(0x6000, 8, 0)]]}, {0x6000: struct.pack("<II", 8, 9)}),
    "balloon-stats": seed(1, 2, {2: [[(0x6000, 20, 0)]]},
                          {0x6000: struct.pack("<HQ", 5, 1 << 20) + struct.pack("<HQ", 4, 1 << 19)}),
    # Device byte 67: 67 % 5 = 2 (mem), 67 >> 6 = 1 block requested.
    "mem-plug": seed(67, 0, {0: [[(0x6000, 24, 0), (0x6800, 10, WRITE)]]},
                     {0x6000: struct.pack("<H6xQH6x", 0, HOTPLUG_START, 1)}),
    "mem-state": seed(67, 0, {0: [[(0x6000, 24, 0), (0x6800, 10, WRITE)]]},
                      {0x6000: struct.pack("<H6xQH6x", 3, HOTPLUG_START, 2)}),
    "mem-unplug-all": seed(67, 0, {0: [[(0x6000, 24, 0), (0x6800, 10, WRITE)]]},
                           {0x6000: struct.pack("<H6xQH6x", 2, 0, 0)}),
    # The first byte of memory is also the length of the frame arriving from the "tap".
    "net-tx": seed(3, 1, {1: [[(0x6000, 12 + 60, 0)]]},
                   {0x6000: bytes(12) + b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x06" + bytes(46)}),
    "net-rx": seed(3, 0, {0: [[(0x6000, 1526, WRITE)]]}, {0: bytes([60])}),
    "vsock-connect": seed(4, 1, {0: [[(0x7000, 44, WRITE)]], 1: [[(0x6000, 44, 0)]]},
                          {0x6000: vsock_header(1, 1000, 1234)}),
    "vsock-rw": seed(4, 1, {0: [[(0x7000, 44 + 64, WRITE)]], 1: [[(0x6000, 44, 0), (0x6800, 16, 0)]]},
                     {0x6000: vsock_header(5, 1000, 1234, 16), 0x6800: b"hello, host side"}),
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "virtio_devices")
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {out}")
