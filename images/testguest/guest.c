/*
 * The fleet test guest: a freestanding program for KVM hosts where guest ring-0 code is emulated
 * slowly (nested PVM). It does as little as it can before its readiness line, finds CPUs and devices
 * only by walking the ACPI tables it is given, and reports in the line protocol of
 * docs/test-guest.md on COM1.
 *
 * Built with -mgeneral-regs-only: SSE instructions in ring 0 kill the VM on those hosts.
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0x501
#define LAPIC 0xfee00000u
#define IOAPIC 0xfec00000u
#define TRAMPOLINE_ADDR 0x8000u
#define TIMER_VECTOR 0x40
#define GED_VECTOR 0x41
#define SPURIOUS_VECTOR 0xff
#define MAX_CPUS 64
#define MAX_DEVICES 32
#define PAGE 4096u
#define MIB (1024u * 1024u)

/* ---- port and MMIO access ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void mmio_write32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write8(u32 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline u8 mmio_read8(u32 addr) { return *(volatile u8 *)addr; }

void *memcpy(void *d, const void *s, unsigned long n) {
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n)::"memory");
    return r;
}
void *memset(void *d, int c, unsigned long n) {
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

/* ---- console: one `rep outsb` per line, one VM exit instead of one per byte ---- */
static volatile u32 console_lock;

static void lock(volatile u32 *l) {
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) __asm__ volatile("pause");
}
static void unlock(volatile u32 *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

struct line {
    char buf[256];
    u32 len;
};

static void put(struct line *l, const char *s) {
    while (*s && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = *s++;
}
static void put_u(struct line *l, u32 v) {
    char tmp[10];
    int i = 0;
    do {
        tmp[i++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (i && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = tmp[--i];
}
static void put_x(struct line *l, u32 v) {
    static const char hex[] = "0123456789abcdef";
    put(l, "0x");
    int started = 0;
    for (int shift = 28; shift >= 0; shift -= 4) {
        u32 d = (v >> shift) & 0xf;
        if (d || started || shift == 0) {
            started = 1;
            if (l->len < sizeof(l->buf) - 1) l->buf[l->len++] = hex[d];
        }
    }
}
static void emit(struct line *l) {
    l->buf[l->len++] = '\n';
    const char *p = l->buf;
    u32 n = l->len;
    lock(&console_lock);
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(COM1) : "memory");
    unlock(&console_lock);
    l->len = 0;
}
static void say(const char *s) {
    struct line l = {.len = 0};
    put(&l, "tg: ");
    put(&l, s);
    emit(&l);
}

/* ---- boot information (PVH start_info) ---- */
struct start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};

/* ---- ACPI ---- */
struct sdt {
    char sig[4];
    u32 length;
    u8 revision, checksum;
    char oem_id[6], oem_table_id[8];
    u32 oem_revision, creator_id, creator_revision;
} __attribute__((packed));

struct gas {
    u8 space, bit_width, bit_offset, access_size;
    u64 address;
} __attribute__((packed));

static int sig_eq(const char *a, const char *b, int n) {
    for (int i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static const struct sdt *xsdt_find(const struct sdt *xsdt, const char *sig) {
    u32 n = (xsdt->length - sizeof(struct sdt)) / 8;
    const u8 *entries = (const u8 *)xsdt + sizeof(struct sdt);
    for (u32 i = 0; i < n; i++) {
        u32 addr = *(const u32 *)(entries + 8 * i); /* tables live below 4 GiB */
        const struct sdt *t = (const struct sdt *)addr;
        if (sig_eq(t->sig, sig, 4)) return t;
    }
    return 0;
}

static u32 cpu_count;
/* Processor entries of any kind: enabled, and online-capable slots for CPUs added later. */
static u32 cpu_slots;
static u8 cpu_apic_ids[MAX_CPUS];
static u32 ioapic_addr = IOAPIC;

/* MADT: enabled processor-local APICs, and the IOAPIC address. */
static void parse_madt(const struct sdt *madt) {
    const u8 *p = (const u8 *)madt + 44;
    const u8 *end = (const u8 *)madt + madt->length;
    while (p + 2 <= end && p[1] >= 2) {
        if (p[0] == 0 && (*(const u32 *)(p + 4) & 3)) cpu_slots++;
        if (p[0] == 0 && (*(const u32 *)(p + 4) & 1) && cpu_count < MAX_CPUS)
            cpu_apic_ids[cpu_count++] = p[3];
        else if (p[0] == 1)
            ioapic_addr = *(const u32 *)(p + 4);
        p += p[1];
    }
}

/* Power-off through the FADT's registers, with the \_S5 sleep type from the DSDT. */
static struct gas sleep_control;
static u32 pm1a_cnt;
static int hw_reduced;
static u8 s5_type = 5;

static u32 aml_pkglen(const u8 *p, u32 *len_bytes) {
    u32 follow = p[0] >> 6;
    u32 len = follow ? (p[0] & 0x0f) : (p[0] & 0x3f);
    for (u32 i = 0; i < follow; i++) len |= (u32)p[1 + i] << (4 + 8 * i);
    *len_bytes = follow + 1;
    return len;
}

struct device {
    char hid[9];
    u32 mmio_base, mmio_len, irq, io_base;
    u32 region_base; /* first SystemMemory OperationRegion inside the device */
};
static struct device devices[MAX_DEVICES];
static u32 device_count;

/* _CRS buffer: Memory32Fixed (0x86), extended IRQ (0x89), IO (0x47), small IRQ (0x22/0x23). */
static void parse_crs(const u8 *p, const u8 *end, struct device *d) {
    while (p < end) {
        if (p[0] & 0x80) {
            u32 len = p[1] | (p[2] << 8);
            if (p[0] == 0x86 && len >= 9) {
                d->mmio_base = *(const u32 *)(p + 4);
                d->mmio_len = *(const u32 *)(p + 8);
            } else if (p[0] == 0x89 && len >= 6) {
                d->irq = *(const u32 *)(p + 5);
            }
            p += 3 + len;
        } else {
            u32 len = p[0] & 7, kind = (p[0] >> 3) & 0xf;
            if (kind == 0xf) break; /* end tag */
            if (kind == 0x4 && len >= 2) {
                u16 mask = p[1] | (p[2] << 8);
                for (u32 i = 0; i < 16; i++)
                    if (mask & (1u << i)) d->irq = i;
            } else if (kind == 0x8 && len >= 7) {
                d->io_base = p[2] | (p[3] << 8);
            }
            p += 1 + len;
        }
    }
}

/* EISA id (compressed) to text, e.g. PNP0501. */
static void eisa_to_str(u32 v, char *out) {
    static const char hex[] = "0123456789ABCDEF";
    u32 b = ((v & 0xff) << 24) | ((v & 0xff00) << 8) | ((v >> 8) & 0xff00) | (v >> 24);
    out[0] = '@' + ((b >> 26) & 0x1f);
    out[1] = '@' + ((b >> 21) & 0x1f);
    out[2] = '@' + ((b >> 16) & 0x1f);
    for (int i = 0; i < 4; i++) out[3 + i] = hex[(b >> (12 - 4 * i)) & 0xf];
    out[7] = 0;
}

/* Reads a Name(_HID/_CRS, ...) at p (just past "_HID"/"_CRS"). */
static void parse_named(const u8 *name, const u8 *end, struct device *d) {
    const u8 *v = name + 4;
    if (v >= end) return;
    if (sig_eq((const char *)name, "_HID", 4)) {
        if (v[0] == 0x0d) { /* string */
            u32 i = 0;
            for (; i < 8 && v[1 + i]; i++) d->hid[i] = v[1 + i];
            d->hid[i] = 0;
        } else if (v[0] == 0x0c) { /* dword: EISA id */
            eisa_to_str(*(const u32 *)(v + 1), d->hid);
        }
    } else if (sig_eq((const char *)name, "_CRS", 4) && v[0] == 0x11) { /* buffer */
        u32 lb, len = aml_pkglen(v + 1, &lb);
        const u8 *body = v + 1 + lb;
        const u8 *bend = v + 1 + len;
        if (bend > end) bend = end;
        /* BufferSize is an integer term: skip its prefix and value. */
        u32 skip = body[0] == 0x0a ? 2 : body[0] == 0x0b ? 3 : body[0] == 0x0c ? 5 : 1;
        parse_crs(body + skip, bend, d);
    }
}

/*
 * Walks the DSDT for Device() objects and their _HID and _CRS, and for \_S5. A byte scan guided by
 * the AML encoding: enough for tables whose devices carry Name objects, which is what a VMM emits.
 */
static void parse_dsdt(const struct sdt *dsdt) {
    const u8 *p = (const u8 *)dsdt + sizeof(struct sdt);
    const u8 *end = (const u8 *)dsdt + dsdt->length;
    struct device *cur = 0;
    const u8 *cur_end = 0;
    for (; p + 5 < end; p++) {
        if (cur && p >= cur_end) cur = 0;
        if (p[0] == 0x5b && p[1] == 0x82) { /* DeviceOp */
            u32 lb, len = aml_pkglen(p + 2, &lb);
            if (device_count < MAX_DEVICES) {
                cur = &devices[device_count++];
                cur->hid[0] = 0;
                cur_end = p + 2 + len;
            }
            p += 1 + lb;
            continue;
        }
        if (cur && p[0] == 0x5b && p[1] == 0x80 && p[6] == 0x00 && !cur->region_base) {
            /* OperationRegion(name, SystemMemory, offset, len) */
            const u8 *o = p + 7;
            cur->region_base = o[0] == 0x0c || o[0] == 0x0e ? *(const u32 *)(o + 1)
                               : o[0] == 0x0b              ? (u32)(o[1] | (o[2] << 8))
                                                           : 0;
            p += 6;
            continue;
        }
        if (p[0] == 0x08) { /* NameOp */
            if (sig_eq((const char *)p + 1, "_S5_", 4) && p[5] == 0x12) {
                u32 lb;
                aml_pkglen(p + 6, &lb);
                const u8 *e = p + 6 + lb + 1; /* past NumElements */
                s5_type = e[0] == 0x0a ? e[1] : e[0] == 0x01 ? 1 : e[0] == 0x00 ? 0 : e[0];
            } else if (cur) {
                parse_named(p + 1, cur_end, cur);
            }
        }
    }
}

static void parse_fadt(const struct sdt *fadt) {
    const u8 *f = (const u8 *)fadt;
    u32 flags = *(const u32 *)(f + 112);
    hw_reduced = (flags >> 20) & 1;
    pm1a_cnt = *(const u32 *)(f + 64);
    if (fadt->length >= 244) sleep_control = *(const struct gas *)(f + 244);
    const struct sdt *dsdt = 0;
    if (fadt->length >= 148 && *(const u32 *)(f + 140)) dsdt = (const struct sdt *)*(const u32 *)(f + 140);
    else dsdt = (const struct sdt *)*(const u32 *)(f + 40);
    if (dsdt) parse_dsdt(dsdt);
}

static void acpi_poweroff(void) {
    say("poweroff");
    if (hw_reduced && sleep_control.address) {
        u8 v = (u8)((s5_type << 2) | (1 << 5));
        if (sleep_control.space == 1) outb((u16)sleep_control.address, v);
        else *(volatile u8 *)(u32)sleep_control.address = v;
    } else if (pm1a_cnt) {
        outw((u16)pm1a_cnt, (u16)((s5_type << 10) | (1 << 13)));
    }
    /* No ACPI power-off happened: tell the VMM through the debug-exit port, with failure. */
    outb(DEBUG_EXIT_PORT, 1);
    for (;;) __asm__ volatile("cli; hlt");
}

static const struct sdt *find_rsdp_xsdt(u32 rsdp) {
    if (!rsdp) {
        for (u32 a = 0xe0000; a < 0x100000; a += 16)
            if (sig_eq((const char *)a, "RSD PTR ", 8)) {
                rsdp = a;
                break;
            }
    }
    if (!rsdp) return 0;
    const u8 *r = (const u8 *)rsdp;
    if (r[15] >= 2 && *(const u32 *)(r + 24)) return (const struct sdt *)*(const u32 *)(r + 24);
    return 0; /* RSDT-only firmware is not supported */
}

/* ---- interrupts ---- */
struct idt_entry {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));
static struct idt_entry idt[256];
extern void isr_timer(void), isr_ged(void), isr_spurious(void), isr_unexpected(void);

static void set_gate(int v, void (*h)(void)) {
    u32 a = (u32)h;
    idt[v] = (struct idt_entry){(u16)a, 0x08, 0, 0x8e, (u16)(a >> 16)};
}

static void load_idt(void) {
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) ptr = {sizeof(idt) - 1, (u32)idt};
    __asm__ volatile("lidt %0" ::"m"(ptr));
}

static volatile u32 ticks;
static volatile u32 ged_pending;

void on_timer(void) {
    ticks++;
    mmio_write32(LAPIC + 0xb0, 0);
}

/* GED: the event register is the first dword of the LNRO/ACPI0013 window the DSDT gave. */
static u32 ged_base;
void on_ged(void) {
    if (ged_base) ged_pending |= mmio_read32(ged_base);
    mmio_write32(LAPIC + 0xb0, 0);
}

extern void (*const exception_stubs[32])(void);

void on_unexpected(u32 vector, u32 err_or_eip, u32 eip) {
    struct line l = {.len = 0};
    put(&l, "tg: error exception vector=");
    put_u(&l, vector);
    put(&l, " word1=");
    put_x(&l, err_or_eip);
    put(&l, " word2=");
    put_x(&l, eip);
    emit(&l);
    outb(DEBUG_EXIT_PORT, 2);
}

/* ---- command line ---- */
static const char *cmdline = "";

/* Value of `key=` on the command line, or 0. */
static const char *arg(const char *key) {
    const char *p = cmdline;
    u32 klen = 0;
    while (key[klen]) klen++;
    while (*p) {
        while (*p == ' ') p++;
        if (sig_eq(p, key, (int)klen) && p[klen] == '=') return p + klen + 1;
        while (*p && *p != ' ') p++;
    }
    return 0;
}
static int arg_is(const char *key, const char *val) {
    const char *v = arg(key);
    if (!v) return 0;
    u32 i = 0;
    for (; val[i]; i++)
        if (v[i] != val[i]) return 0;
    return v[i] == 0 || v[i] == ' ';
}
static u32 arg_u(const char *key, u32 dflt) {
    const char *v = arg(key);
    if (!v || *v < '0' || *v > '9') return dflt;
    u32 n = 0;
    while (*v >= '0' && *v <= '9') n = n * 10 + (u32)(*v++ - '0');
    return n;
}

/* ---- SMP ---- */
extern char ap_trampoline[], ap_trampoline_end[];
static volatile u32 aps_up;

void ap_main(u32 apic_id) {
    struct line l = {.len = 0};
    put(&l, "tg: cpu-up apic=");
    put_u(&l, apic_id);
    emit(&l);
    __atomic_fetch_add(&aps_up, 1, __ATOMIC_SEQ_CST);
    for (;;) __asm__ volatile("cli; hlt");
}

static u32 lapic_id(void) { return mmio_read32(LAPIC + 0x20) >> 24; }

static void start_ap(u32 id) {
    mmio_write32(LAPIC + 0x310, id << 24);
    mmio_write32(LAPIC + 0x300, 0x4500); /* INIT */
    mmio_write32(LAPIC + 0x310, id << 24);
    mmio_write32(LAPIC + 0x300, 0x4600 | (TRAMPOLINE_ADDR >> 12)); /* SIPI */
}

static void start_aps(void) {
    memcpy((void *)TRAMPOLINE_ADDR, ap_trampoline, (u32)(ap_trampoline_end - ap_trampoline));
    u32 self = lapic_id();
    u32 expected = 0;
    for (u32 i = 0; i < cpu_count; i++) {
        u32 id = cpu_apic_ids[i];
        if (id == self) continue;
        expected++;
        start_ap(id);
    }
    /* Wait up to ~2 s of timer ticks for every AP. */
    u32 deadline = ticks + 200;
    while (aps_up < expected && ticks < deadline) __asm__ volatile("sti; hlt; cli");
    struct line l = {.len = 0};
    put(&l, "tg: smp cpus=");
    put_u(&l, aps_up + 1);
    put(&l, aps_up == expected ? " ok" : " missing");
    emit(&l);
}

/* ---- CPU hotplug: the VMM's controller (docs/hotplug.md), at its fixed address. What the
 * DSDT's CSCN does for Linux, done by hand on the GED's CPU event: a slot inserted is started
 * (INIT, SIPI), a slot asked to go is ejected at once (its AP only ever halts). ---- */
#define CPU_HP 0xfeb01000u
#define CPU_HP_STATUS (CPU_HP + 4)

static void cpu_hotplug_scan(void) {
    memcpy((void *)TRAMPOLINE_ADDR, ap_trampoline, (u32)(ap_trampoline_end - ap_trampoline));
    for (u32 i = 0; i < cpu_slots; i++) {
        mmio_write32(CPU_HP, i);
        u8 st = mmio_read8(CPU_HP_STATUS);
        struct line l = {.len = 0};
        if (st & 2) {
            mmio_write8(CPU_HP_STATUS, 2);
            start_ap(i);
            put(&l, "tg: cpu-added apic=");
        } else if (st & 4) {
            mmio_write8(CPU_HP_STATUS, 4);
            mmio_write8(CPU_HP_STATUS, 8);
            put(&l, "tg: cpu-ejected apic=");
        } else {
            continue;
        }
        put_u(&l, i);
        emit(&l);
    }
}

/* ---- workloads ---- */
#define TICK_MS 10u

static void start_timer(void) {
    mmio_write32(LAPIC + 0xf0, 0x100 | SPURIOUS_VECTOR); /* enable */
    mmio_write32(LAPIC + 0x3e0, 0xb);                    /* divide by 1 */
    mmio_write32(LAPIC + 0x320, (1u << 17) | TIMER_VECTOR); /* periodic */
    /* KVM's LAPIC timer counts at 1 GHz (1 ns APIC bus cycle). */
    mmio_write32(LAPIC + 0x380, TICK_MS * 1000000u);
}

static void route_ged(u32 gsi) {
    /* Edge, active high, fixed delivery to this CPU. */
    mmio_write32(ioapic_addr, 0x10 + 2 * gsi);
    mmio_write32(ioapic_addr + 0x10, GED_VECTOR);
    mmio_write32(ioapic_addr, 0x10 + 2 * gsi + 1);
    mmio_write32(ioapic_addr + 0x10, lapic_id() << 24);
}

/* ---- network: a polled virtio-net (MMIO, version 2) driver that answers ARP and ping ---- */
#define VQ_SIZE 16
#define FRAME_BUF 1536
#define NET_HDR 12 /* struct virtio_net_hdr with num_buffers (VIRTIO_F_VERSION_1) */

struct vq_desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct vq {
    struct vq_desc desc[VQ_SIZE];
    struct {
        u16 flags, idx, ring[VQ_SIZE], used_event;
    } avail;
    struct {
        u16 flags, idx;
        struct {
            u32 id, len;
        } ring[VQ_SIZE];
        u16 avail_event;
    } used __attribute__((aligned(4)));
    u16 last_used;
} __attribute__((aligned(4096)));

static struct vq rxq, txq;
static u8 rx_buf[VQ_SIZE][FRAME_BUF], tx_buf[VQ_SIZE][FRAME_BUF];
static u32 net_base, net_ip;
static u8 net_mac[6];
static u32 net_replies;

static u32 be16(const u8 *p) { return (u32)p[0] << 8 | p[1]; }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

/* `a.b.c.d` → the address in host order; 0 if malformed. */
static u32 parse_ip(const char *v) {
    u32 ip = 0;
    for (int part = 0; part < 4; part++) {
        if (*v < '0' || *v > '9') return 0;
        u32 n = 0;
        while (*v >= '0' && *v <= '9') n = n * 10 + (u32)(*v++ - '0');
        if (n > 255 || (part < 3 && *v++ != '.')) return 0;
        ip = ip << 8 | n;
    }
    return ip;
}

static int vq_setup(u32 base, u32 index, struct vq *q) {
    mmio_write32(base + 0x030, index);
    if (mmio_read32(base + 0x034) < VQ_SIZE) return 0;
    mmio_write32(base + 0x038, VQ_SIZE);
    mmio_write32(base + 0x080, (u32)q->desc);
    mmio_write32(base + 0x084, 0);
    mmio_write32(base + 0x090, (u32)&q->avail);
    mmio_write32(base + 0x094, 0);
    mmio_write32(base + 0x0a0, (u32)&q->used);
    mmio_write32(base + 0x0a4, 0);
    mmio_write32(base + 0x044, 1);
    return 1;
}

/* Brings up the first virtio-net device: MAC feature only, receive buffers posted. */
static int net_init(u32 ip) {
    for (u32 i = 0; i < device_count && !net_base; i++)
        if (sig_eq(devices[i].hid, "LNRO0005", 8) && mmio_read32(devices[i].mmio_base + 0x008) == 1)
            net_base = devices[i].mmio_base;
    if (!net_base) return 0;
    u32 b = net_base;
    mmio_write32(b + 0x070, 0);
    mmio_write32(b + 0x070, 1 | 2); /* ACKNOWLEDGE, DRIVER */
    mmio_write32(b + 0x024, 0);
    mmio_write32(b + 0x020, 1u << 5); /* VIRTIO_NET_F_MAC */
    mmio_write32(b + 0x024, 1);
    mmio_write32(b + 0x020, 1); /* VIRTIO_F_VERSION_1 */
    mmio_write32(b + 0x070, 1 | 2 | 8);
    if (!(mmio_read32(b + 0x070) & 8) || !vq_setup(b, 0, &rxq) || !vq_setup(b, 1, &txq)) {
        mmio_write32(b + 0x070, 0x80); /* FAILED */
        net_base = 0;
        return 0;
    }
    for (int i = 0; i < 6; i++) net_mac[i] = *(volatile u8 *)(b + 0x100 + (u32)i);
    for (u32 i = 0; i < VQ_SIZE; i++) {
        rxq.desc[i] = (struct vq_desc){(u32)rx_buf[i], FRAME_BUF, 2 /* device writes */, 0};
        rxq.avail.ring[i] = (u16)i;
    }
    __atomic_store_n(&rxq.avail.idx, VQ_SIZE, __ATOMIC_RELEASE);
    mmio_write32(b + 0x070, 1 | 2 | 8 | 4); /* DRIVER_OK */
    mmio_write32(b + 0x050, 0);
    net_ip = ip;
    return 1;
}

static void net_send(const u8 *frame, u32 len) {
    u16 idx = txq.avail.idx;
    if ((u16)(idx - __atomic_load_n(&txq.used.idx, __ATOMIC_ACQUIRE)) >= VQ_SIZE) return; /* full: drop */
    u32 slot = idx % VQ_SIZE;
    memset(tx_buf[slot], 0, NET_HDR);
    memcpy(tx_buf[slot] + NET_HDR, frame, len);
    txq.desc[slot] = (struct vq_desc){(u32)tx_buf[slot], NET_HDR + len, 0, 0};
    txq.avail.ring[slot] = (u16)slot;
    __atomic_store_n(&txq.avail.idx, (u16)(idx + 1), __ATOMIC_RELEASE);
    mmio_write32(net_base + 0x050, 1);
    net_replies++;
}

static u32 csum(const u8 *p, u32 len) {
    u32 sum = 0;
    for (u32 i = 0; i + 1 < len; i += 2) sum += be16(p + i);
    if (len & 1) sum += (u32)p[len - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

/* One received Ethernet frame: an ARP request for our address, or an echo request to it. */
static void net_frame(u8 *f, u32 len) {
    static u8 out[FRAME_BUF];
    if (len < 42) return;
    u32 type = be16(f + 12);
    if (type == 0x0806 && be16(f + 20) == 1 && be32(f + 38) == net_ip) {
        memcpy(out, f + 6, 6);
        memcpy(out + 6, net_mac, 6);
        memcpy(out + 12, f + 12, 8); /* ethertype, htype, ptype, sizes */
        out[20] = 0, out[21] = 2;    /* reply */
        memcpy(out + 22, net_mac, 6);
        memcpy(out + 28, f + 38, 4);
        memcpy(out + 32, f + 22, 10); /* the asker's MAC and address */
        net_send(out, 42);
        return;
    }
    if (type != 0x0800 || (f[14] >> 4) != 4) return;
    u32 ihl = (u32)(f[14] & 15) * 4, total = be16(f + 16);
    if (ihl < 20 || total < ihl + 8 || 14 + total > len || f[23] != 1 || be32(f + 30) != net_ip) return;
    u8 *icmp = f + 14 + ihl;
    if (icmp[0] != 8) return;
    memcpy(out, f + 6, 6);
    memcpy(out + 6, net_mac, 6);
    memcpy(out + 12, f + 12, 14 + total - 12);
    memcpy(out + 26, f + 30, 4); /* addresses swapped: the IP checksum stays right */
    memcpy(out + 30, f + 26, 4);
    u8 *reply = out + 14 + ihl;
    reply[0] = 0;
    reply[2] = reply[3] = 0;
    u32 c = csum(reply, total - ihl);
    reply[2] = (u8)(c >> 8), reply[3] = (u8)c;
    net_send(out, 14 + total);
}

/* Called every tick: handles what arrived and gives the buffers back. */
static void net_poll(void) {
    if (!net_base) return;
    int posted = 0;
    while (rxq.last_used != __atomic_load_n(&rxq.used.idx, __ATOMIC_ACQUIRE)) {
        u32 id = rxq.used.ring[rxq.last_used % VQ_SIZE].id % VQ_SIZE;
        u32 len = rxq.used.ring[rxq.last_used % VQ_SIZE].len;
        if (len > NET_HDR && len <= FRAME_BUF) net_frame(rx_buf[id] + NET_HDR, len - NET_HDR);
        u16 a = rxq.avail.idx;
        rxq.avail.ring[a % VQ_SIZE] = (u16)id;
        __atomic_store_n(&rxq.avail.idx, (u16)(a + 1), __ATOMIC_RELEASE);
        rxq.last_used++;
        posted = 1;
    }
    if (posted) mmio_write32(net_base + 0x050, 0);
}

/* ---- memory hotplug: a polled virtio-mem driver. It holds blocks [0, plugged) of the device's
 * region and follows requested_size: plugs from the bottom, unplugs from the top.
 * `tg.mem_keep_mib=N` makes it refuse to go below N MiB (memory "in use").
 * The region lies above 4 GiB, out of reach of this 32-bit guest (and the host's PVM refuses
 * guest paging, so no PAE window either): when the VM has a virtio-blk disk, each plugged block
 * is filled by a 2 MiB disk read into it instead, so the host has to back every page. ---- */
#define MEM_BLOCK (2u * MIB)

static struct vq memq, blkq;
static u8 blk_hdr[16], blk_status;
static u32 blk_base;
static u8 mem_req[24], mem_resp[10];
static u32 mem_base;
static u64 mem_addr;
static u32 mem_plugged, mem_keep, mem_stuck;

static u64 mem_cfg64(u32 off) {
    return (u64)mmio_read32(mem_base + 0x100 + off) | (u64)mmio_read32(mem_base + 0x104 + off) << 32;
}

/* One virtio-blk request on `len` bytes at guest address `addr`: a read (the device writes the
 * buffer) or a write of sector `sector`. Returns the status byte, 0xff if no answer in 1 s. */
static u8 blk_rw(u32 type, u64 sector, u64 addr, u32 len) {
    memset(blk_hdr, 0, sizeof(blk_hdr));
    blk_hdr[0] = (u8)type;
    for (int i = 0; i < 8; i++) blk_hdr[8 + i] = (u8)(sector >> (8 * i));
    blk_status = 0xff;
    blkq.desc[0] = (struct vq_desc){(u32)blk_hdr, sizeof(blk_hdr), 1, 1};
    blkq.desc[1] = (struct vq_desc){addr, len, type == 0 ? 1 | 2 : 1, 2};
    blkq.desc[2] = (struct vq_desc){(u32)&blk_status, 1, 2, 0};
    u16 idx = blkq.avail.idx;
    blkq.avail.ring[idx % VQ_SIZE] = 0;
    __atomic_store_n(&blkq.avail.idx, (u16)(idx + 1), __ATOMIC_RELEASE);
    mmio_write32(blk_base + 0x050, 0);
    u32 deadline = ticks + 100;
    while (__atomic_load_n(&blkq.used.idx, __ATOMIC_ACQUIRE) == blkq.last_used && (int)(ticks - deadline) < 0)
        __asm__ volatile("sti; pause; cli");
    if (__atomic_load_n(&blkq.used.idx, __ATOMIC_ACQUIRE) == blkq.last_used) return 0xff;
    blkq.last_used++;
    return blk_status;
}

/* Fills block `b` of the region from the disk's first 2 MiB. */
static void mem_fill(u32 b) {
    blk_rw(0, 0, mem_addr + (u64)b * MEM_BLOCK, MEM_BLOCK);
}

static int blk_init(void) {
    for (u32 i = 0; i < device_count && !blk_base; i++)
        if (sig_eq(devices[i].hid, "LNRO0005", 8) && mmio_read32(devices[i].mmio_base + 0x008) == 2)
            blk_base = devices[i].mmio_base;
    if (!blk_base) return 0;
    u32 b = blk_base;
    mmio_write32(b + 0x070, 0);
    mmio_write32(b + 0x070, 1 | 2);
    mmio_write32(b + 0x024, 0);
    mmio_write32(b + 0x020, 0);
    mmio_write32(b + 0x024, 1);
    mmio_write32(b + 0x020, 1); /* VIRTIO_F_VERSION_1 */
    mmio_write32(b + 0x070, 1 | 2 | 8);
    if (!(mmio_read32(b + 0x070) & 8) || !vq_setup(b, 0, &blkq)) {
        mmio_write32(b + 0x070, 0x80);
        blk_base = 0;
        return 0;
    }
    mmio_write32(b + 0x070, 1 | 2 | 8 | 4);
    return 1;
}

static int mem_init(void) {
    for (u32 i = 0; i < device_count && !mem_base; i++)
        if (sig_eq(devices[i].hid, "LNRO0005", 8) && mmio_read32(devices[i].mmio_base + 0x008) == 24)
            mem_base = devices[i].mmio_base;
    if (!mem_base) return 0;
    u32 b = mem_base;
    mmio_write32(b + 0x070, 0);
    mmio_write32(b + 0x070, 1 | 2);
    mmio_write32(b + 0x024, 0);
    mmio_write32(b + 0x020, 1u << 1); /* VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE */
    mmio_write32(b + 0x024, 1);
    mmio_write32(b + 0x020, 1); /* VIRTIO_F_VERSION_1 */
    mmio_write32(b + 0x070, 1 | 2 | 8);
    if (!(mmio_read32(b + 0x070) & 8) || !vq_setup(b, 0, &memq)) {
        mmio_write32(b + 0x070, 0x80);
        mem_base = 0;
        return 0;
    }
    mmio_write32(b + 0x070, 1 | 2 | 8 | 4);
    mem_addr = mem_cfg64(16);
    mem_keep = arg_u("tg.mem_keep_mib", 0) / 2;
    blk_init();
    return 1;
}

/* One request; returns the response type, or 0xffff if the device did not answer in 1 s. */
static u32 mem_request(u16 type, u32 first, u32 n) {
    u64 addr = mem_addr + (u64)first * MEM_BLOCK;
    memset(mem_req, 0, sizeof(mem_req));
    mem_req[0] = (u8)type;
    for (int i = 0; i < 8; i++) mem_req[8 + i] = (u8)(addr >> (8 * i));
    mem_req[16] = (u8)n;
    mem_req[17] = (u8)(n >> 8);
    memq.desc[0] = (struct vq_desc){(u32)mem_req, sizeof(mem_req), 1 /* next */, 1};
    memq.desc[1] = (struct vq_desc){(u32)mem_resp, sizeof(mem_resp), 2 /* device writes */, 0};
    u16 idx = memq.avail.idx;
    memq.avail.ring[idx % VQ_SIZE] = 0;
    __atomic_store_n(&memq.avail.idx, (u16)(idx + 1), __ATOMIC_RELEASE);
    mmio_write32(mem_base + 0x050, 0);
    u32 deadline = ticks + 100;
    while (__atomic_load_n(&memq.used.idx, __ATOMIC_ACQUIRE) == memq.last_used && (int)(ticks - deadline) < 0)
        __asm__ volatile("sti; pause; cli");
    if (__atomic_load_n(&memq.used.idx, __ATOMIC_ACQUIRE) == memq.last_used) return 0xffff;
    memq.last_used++;
    return (u32)mem_resp[0] | (u32)mem_resp[1] << 8;
}

/* Follows requested_size; reports each change. */
static void mem_poll(void) {
    if (!mem_base) return;
    u64 req = mem_cfg64(48);
    u32 want = (u32)(req >> 21);
    if (want < mem_keep && mem_plugged > want) want = mem_keep < mem_plugged ? mem_keep : mem_plugged;
    if (want == mem_plugged) {
        mem_stuck = 0;
        return;
    }
    if (mem_stuck) return; /* refused once: wait for a new request */
    struct line l = {.len = 0};
    u32 r;
    if (want > mem_plugged) {
        r = mem_request(0, mem_plugged, want - mem_plugged);
        if (r == 0) {
            if (blk_base)
                for (u32 b = mem_plugged; b < want; b++) mem_fill(b);
            mem_plugged = want;
        }
    } else {
        r = mem_request(1, want, mem_plugged - want);
        if (r == 0) mem_plugged = want;
    }
    if (r != 0) {
        mem_stuck = 1;
        put(&l, "tg: mem error response=");
        put_u(&l, r);
    } else {
        put(&l, "tg: mem plugged_mib=");
        put_u(&l, mem_plugged * 2);
    }
    emit(&l);
}

static volatile u32 heartbeat; /* lives in guest memory: survives snapshot and migration */

/* tg.disk_hb=1: each heartbeat also goes to the disk's first sector ("TGHB" and the counter),
 * after reading back the one before. Memory and disk restored from one instant agree: the
 * heartbeat line says disk=ok, or disk=<what the sector held> when they do not. */
static u8 disk_sector[512];

static void disk_heartbeat(struct line *l, u32 n) {
    if (!blk_base) {
        put(l, " disk=none");
        return;
    }
    if (blk_rw(0, 0, (u32)disk_sector, sizeof(disk_sector)) != 0) {
        put(l, " disk=read-error");
        return;
    }
    u32 found = 0;
    if (disk_sector[0] == 'T' && disk_sector[1] == 'G' && disk_sector[2] == 'H' && disk_sector[3] == 'B')
        found = (u32)disk_sector[4] | (u32)disk_sector[5] << 8 | (u32)disk_sector[6] << 16 | (u32)disk_sector[7] << 24;
    if (found == n - 1) {
        put(l, " disk=ok");
    } else {
        put(l, " disk=");
        put_u(l, found);
    }
    memcpy(disk_sector, "TGHB", 4);
    for (int i = 0; i < 4; i++) disk_sector[4 + i] = (u8)(n >> (8 * i));
    if (blk_rw(1, 0, (u32)disk_sector, sizeof(disk_sector)) != 0) put(l, " disk_write=error");
}

static void run(u32 ram_top) {
    u32 hb_ms = arg_u("tg.hb_ms", 1000);
    u32 dirty_mib = arg_is("tg.mode", "dirty") ? arg_u("tg.dirty_mib", 64) : 0;
    u32 rate_mib = arg_u("tg.rate_mib", 16);
    u32 region = 16 * MIB;
    if (dirty_mib && region + dirty_mib * MIB > ram_top) {
        struct line l = {.len = 0};
        put(&l, "tg: error dirty region larger than memory ram_top=");
        put_x(&l, ram_top);
        emit(&l);
        dirty_mib = (ram_top - region) / MIB;
    }
    u32 pages = dirty_mib * (MIB / PAGE);
    u32 per_tick = pages ? (rate_mib * (MIB / PAGE) * TICK_MS + 999) / 1000 : 0;
    u32 cursor = 0;
    u32 dirtied_pages = 0;
    u32 ignore_button = arg_u("tg.ignore_button", 0);
    u32 ignore_cpu_hotplug = arg_u("tg.ignore_cpu_hotplug", 0);
    u32 stop_after = arg_u("tg.stop_after", 0);
    u32 disk_hb = arg_u("tg.disk_hb", 0);
    if (disk_hb && !blk_base) blk_init();
    /* tg.burn_s=N: the boot CPU spins instead of sleeping for the first N seconds (a guest that
     * is busy, then idle: automatic scaling tests). */
    u32 burn_end = ticks + arg_u("tg.burn_s", 0) * (1000 / TICK_MS);
    u32 burning = burn_end != ticks;
    u32 next_hb = ticks + hb_ms / TICK_MS;
    for (;;) {
        u32 t = ticks;
        if ((ged_pending & 1) && ignore_button) {
            ged_pending = 0;
            say("power-button ignored");
        }
        if (ged_pending & 1) {
            say("power-button");
            acpi_poweroff();
        }
        if (ged_pending & 2) {
            __atomic_fetch_and(&ged_pending, ~2u, __ATOMIC_SEQ_CST);
            if (ignore_cpu_hotplug)
                say("cpu-hotplug ignored");
            else
                cpu_hotplug_scan();
        }
        for (u32 i = 0; i < per_tick; i++) {
            *(volatile u32 *)(region + cursor * PAGE) = t;
            if (++cursor == pages) cursor = 0;
        }
        dirtied_pages += per_tick;
        net_poll();
        mem_poll();
        if ((int)(t - next_hb) >= 0) {
            next_hb += hb_ms / TICK_MS ? hb_ms / TICK_MS : 1;
            struct line l = {.len = 0};
            put(&l, "tg: hb n=");
            put_u(&l, ++heartbeat);
            put(&l, " t_ms=");
            put_u(&l, t * TICK_MS);
            if (pages) {
                put(&l, " dirtied_mib=");
                put_u(&l, dirtied_pages / (MIB / PAGE));
            }
            if (net_base) {
                put(&l, " net_replies=");
                put_u(&l, net_replies);
            }
            if (disk_hb) disk_heartbeat(&l, heartbeat);
            emit(&l);
            if (stop_after && heartbeat >= stop_after) acpi_poweroff();
        }
        if (burning && (int)(ticks - burn_end) >= 0) {
            burning = 0;
            say("burn done");
        }
        /* Sleep until the next interrupt (or, while burning, spin until it). */
        if (burning)
            while (ticks == t && !(ged_pending & 1)) __asm__ volatile("sti; pause; cli");
        else
            while (ticks == t && !(ged_pending & 1)) __asm__ volatile("sti; hlt; cli");
    }
}

/* Misbehaves the way a buggy guest might: absent ports and MMIO, nonsense UART programming. */
static void probe(void) {
    static const u16 ports[] = {0x80, 0x1234, 0xcf8, 0x3c4, 0x60, 0x70, 0xffff};
    for (u32 i = 0; i < sizeof(ports) / sizeof(ports[0]); i++) {
        u8 v;
        __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(ports[i]));
        outb(ports[i], (u8)(v ^ 0x5a));
    }
    u32 x = mmio_read32(0xd0000000u) ^ mmio_read32(0xc0000000u) ^ mmio_read32(0xfeb00ffcu);
    mmio_write32(0xd0000000u, x);
    mmio_write32(0xfeb00004u, 0xffffffffu); /* past the GED register */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x00);
    outb(COM1 + 1, 0x00); /* divisor 0 */
    outb(COM1 + 3, 0xff);
    outb(COM1 + 1, 0xff); /* every interrupt */
    outb(COM1 + 2, 0xff);
    outb(COM1 + 4, 0xff); /* loopback and all */
    outb(COM1 + 7, 0x42);
    /* Back to 8N1, no interrupts, no loopback, so the report below is readable. */
    outb(COM1 + 3, 0x80);
    outb(COM1 + 0, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 4, 0x00);
    say("probe done");
}

void bsp_main(const struct start_info *si) {
    if (si->magic != 0x336ec578) {
        say("error bad-start-info-magic");
        outb(DEBUG_EXIT_PORT, 3);
    }
    if (si->cmdline_paddr) cmdline = (const char *)(u32)si->cmdline_paddr;

    /* Memory from the boot memory map. */
    u64 ram = 0, ram_top = 0;
    const struct memmap_entry *mm = (const struct memmap_entry *)(u32)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (mm[i].type == 1) {
            ram += mm[i].size;
            if (mm[i].addr + mm[i].size <= 0xffffffffull && mm[i].addr + mm[i].size > ram_top)
                ram_top = mm[i].addr + mm[i].size;
        }

    const struct sdt *xsdt = find_rsdp_xsdt((u32)si->rsdp_paddr);
    const struct sdt *madt = xsdt ? xsdt_find(xsdt, "APIC") : 0;
    if (!madt) {
        say("error no-acpi-madt");
        outb(DEBUG_EXIT_PORT, 4);
    }
    parse_madt(madt);

    struct line l = {.len = 0};
    put(&l, "tg: ready cpus=");
    put_u(&l, cpu_count);
    put(&l, " mem_mib=");
    put_u(&l, (u32)((ram + MIB - 1) / MIB));
    emit(&l);

    /* After readiness: the details, which cost more ring-0 work. */
    put(&l, "tg: boot cmdline=\"");
    put(&l, cmdline);
    put(&l, "\" ram_kib=");
    put_u(&l, (u32)(ram / 1024));
    emit(&l);
    for (u32 i = 0; i < cpu_count; i++) {
        put(&l, "tg: cpu apic=");
        put_u(&l, cpu_apic_ids[i]);
        emit(&l);
    }
    const struct sdt *fadt = xsdt_find(xsdt, "FACP");
    if (fadt) parse_fadt(fadt);
    u32 virtio = 0;
    u32 ged_gsi = 0;
    for (u32 i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        put(&l, "tg: device hid=");
        put(&l, d->hid[0] ? d->hid : "?");
        if (d->mmio_len) {
            put(&l, " mmio=");
            put_x(&l, d->mmio_base);
            put(&l, "+");
            put_x(&l, d->mmio_len);
        }
        if (d->io_base) {
            put(&l, " io=");
            put_x(&l, d->io_base);
        }
        put(&l, " irq=");
        put_u(&l, d->irq);
        emit(&l);
        if (sig_eq(d->hid, "LNRO0005", 8)) virtio++;
        if (sig_eq(d->hid, "ACPI0013", 8)) {
            ged_gsi = d->irq;
            ged_base = d->region_base;
        }
    }
    put(&l, "tg: acpi cpus=");
    put_u(&l, cpu_count);
    put(&l, " devices=");
    put_u(&l, device_count);
    put(&l, " virtio=");
    put_u(&l, virtio);
    put(&l, " s5=");
    put_u(&l, s5_type);
    put(&l, hw_reduced ? " hw_reduced=1" : " hw_reduced=0");
    put(&l, " slots=");
    put_u(&l, cpu_slots);
    emit(&l);
    /* CPUID leaf 1: EBX[23:16] is the logical processor count of the package (the topology the
       VMM gives covers every slot, present or not). */
    u32 eax = 1, ebx, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    put(&l, "tg: cpuid logical=");
    put_u(&l, (ebx >> 16) & 0xff);
    emit(&l);

    for (int v = 0; v < 32; v++) set_gate(v, exception_stubs[v]);
    set_gate(TIMER_VECTOR, isr_timer);
    set_gate(GED_VECTOR, isr_ged);
    set_gate(SPURIOUS_VECTOR, isr_spurious);
    load_idt();
    /* Mask the legacy PICs: nobody initialised them, so their vectors would land on exceptions. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    start_timer();
    if (ged_gsi) route_ged(ged_gsi);

    if (arg("tg.ip")) {
        u32 ip = parse_ip(arg("tg.ip"));
        if (ip && net_init(ip)) {
            put(&l, "tg: net mac=");
            for (int i = 0; i < 6; i++) {
                if (i) put(&l, ":");
                put(&l, (const char[]){"0123456789abcdef"[net_mac[i] >> 4], "0123456789abcdef"[net_mac[i] & 15], 0});
            }
            emit(&l);
        } else {
            say("net none");
        }
    }
    if (mem_init()) {
        put(&l, "tg: mem region=");
        put_x(&l, (u32)(mem_addr >> 20));
        put(&l, "M size_mib=");
        put_u(&l, (u32)(mem_cfg64(24) >> 20));
        put(&l, blk_base ? " fill=disk" : " fill=none");
        emit(&l);
    }
    if (arg_is("tg.mode", "poweroff") || !arg("tg.mode")) acpi_poweroff();
    if (arg_is("tg.mode", "smp")) {
        start_aps();
        if (arg_is("tg.then", "hold")) run((u32)ram_top);
        acpi_poweroff();
    }
    if (arg_is("tg.mode", "crash")) {
        /* No IDT: the #UD becomes a double, then a triple fault; the VMM must report it. */
        say("crash");
        struct {
            u16 limit;
            u32 base;
        } __attribute__((packed)) none = {0, 0};
        __asm__ volatile("lidt %0; ud2" ::"m"(none));
    }
    if (arg_is("tg.mode", "probe")) {
        probe();
        acpi_poweroff();
    }
    if (arg_is("tg.mode", "exit")) {
        say("debug-exit");
        outb(DEBUG_EXIT_PORT, (u8)arg_u("tg.code", 0));
    }
    run((u32)ram_top);
}
