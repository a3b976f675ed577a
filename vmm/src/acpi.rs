//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced) → DSDT, and the MADT.
//!
//! The DSDT is the only way Debian's cloud kernel finds virtio-mmio devices (`LNRO0005`), so every
//! device the guest should see is declared here. The platform is ACPI hardware-reduced: power-off
//! goes through the FADT sleep control register, events (the power button, later CPU and memory
//! hotplug) through a Generic Event Device.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::arch::layout::*;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"FLEETV";
const OEM_TABLE_ID: [u8; 8] = *b"FLEETVMM";
const OEM_REVISION: u32 = 1;

/// A virtio-mmio device as the DSDT declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiConfig {
    /// vCPUs present at boot.
    pub vcpus: u8,
    /// vCPU slots the MADT lists (present ones enabled, the rest online-capable for hotplug).
    pub max_vcpus: u8,
    pub virtio: Vec<MmioDeviceInfo>,
}

/// The tables in memory order, with their guest addresses. Returned so tests (and `iasl`) can look
/// at each one.
pub struct AcpiTables {
    pub rsdp_addr: u64,
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// AML already encoded, to nest inside another object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the DSDT body: COM1, the power button and GED, the CPU hotplug controller and every
/// vCPU slot's processor, virtio-mmio devices, \_S5.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();

    // COM1.
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    // Power button, signalled through the GED.
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut body);

    // Generic Event Device: the guest's handler reads the event bits and notifies.
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_base = GED_START as usize;
    let ged_len = 4usize;
    let evt_check = aml::And::new(
        &aml::Local(1),
        &aml::Local(0),
        &crate::devices::ged::POWER_BUTTON_BIT,
    );
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    let cpu_check = aml::And::new(
        &aml::Local(2),
        &aml::Local(0),
        &crate::devices::ged::CPU_HOTPLUG_BIT,
    );
    let cpu_scan = aml::MethodCall::new("\\_SB_.PRES.CSCN".into(), vec![]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &ged_crs),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemMemory,
                &ged_base,
                &ged_len,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &evt_check,
                    &aml::If::new(
                        &aml::NotEqual::new(&aml::Local(1), &aml::ZERO),
                        vec![&notify],
                    ),
                    &cpu_check,
                    &aml::If::new(
                        &aml::NotEqual::new(&aml::Local(2), &aml::ZERO),
                        vec![&cpu_scan],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    cpu_hotplug_aml(cfg.max_vcpus).to_aml_bytes(&mut body);
    processors_aml(cfg.max_vcpus).to_aml_bytes(&mut body);

    // virtio-mmio devices.
    for (i, d) in cfg.virtio.iter().enumerate() {
        let window = aml::Memory32Fixed::new(true, d.base as u32, d.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        aml::Device::new(
            format!("_SB_.V{i:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &i),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    // \_S5: the sleep type the sleep control register recognises as power-off.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![
            &ACPI_S5_SLEEP_TYPE,
            &aml::ZERO,
            &aml::ZERO,
            &aml::ZERO,
        ]),
    )
    .to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The CPU hotplug controller (devices/cpu_hotplug.rs, docs/hotplug.md): its registers and the
/// methods the processors and the GED call. `CPLK` serialises every use of the selector.
fn cpu_hotplug_aml(max_vcpus: u8) -> RawAml {
    use crate::devices::cpu_hotplug::{CSEL_OFFSET, REGISTERS_LEN, STATUS_OFFSET};
    let base = CPU_HOTPLUG_START as u32;
    let window = aml::Memory32Fixed::new(true, base, REGISTERS_LEN as u32);
    let crs = aml::ResourceTemplate::new(vec![&window]);
    let (start, len) = (CPU_HOTPLUG_START as usize, REGISTERS_LEN as usize);
    let lock = || aml::Acquire::new("CPLK".into(), 0xffff);
    let unlock = || aml::Release::new("CPLK".into());
    let (csel, cpen, cins, crmv, cej0_bit) = (
        aml::Path::new("CSEL"),
        aml::Path::new("CPEN"),
        aml::Path::new("CINS"),
        aml::Path::new("CRMV"),
        aml::Path::new("CEJ0"),
    );
    let select = aml::Store::new(&csel, &aml::Arg(0));
    let one = aml::ONE;

    // CSTA(slot): 0xF when present, else 0.
    let (lock_sta, unlock_sta) = (lock(), unlock());
    let present = aml::Equal::new(&cpen, &one);
    let set_f = aml::Store::new(&aml::Local(0), &0xfu8);
    let if_present = aml::If::new(&present, vec![&set_f]);
    let zero_l0 = aml::Store::new(&aml::Local(0), &aml::ZERO);
    let ret = aml::Return::new(&aml::Local(0));
    let csta = aml::Method::new(
        "CSTA".into(),
        1,
        true,
        vec![&lock_sta, &select, &zero_l0, &if_present, &unlock_sta, &ret],
    );

    // EJCT(slot): eject (the CEJ0 bit).
    let (lock_ej, unlock_ej) = (lock(), unlock());
    let eject = aml::Store::new(&cej0_bit, &one);
    let cej0 = aml::Method::new(
        "EJCT".into(),
        1,
        true,
        vec![&lock_ej, &select, &eject, &unlock_ej],
    );

    // CSCN: every slot inserted (device check, 1) or asked to go (eject request, 3) is notified
    // and its flag acknowledged.
    let (lock_sc, unlock_sc) = (lock(), unlock());
    let select_l0 = aml::Store::new(&csel, &aml::Local(0));
    let inserting = aml::Equal::new(&cins, &one);
    let tell_insert = aml::MethodCall::new("\\_SB_.CPUS.CTFY".into(), vec![&aml::Local(0), &one]);
    let ack_insert = aml::Store::new(&cins, &one);
    let if_inserting = aml::If::new(&inserting, vec![&tell_insert, &ack_insert]);
    let removing = aml::Equal::new(&crmv, &one);
    let three = 3u8;
    let tell_remove = aml::MethodCall::new("\\_SB_.CPUS.CTFY".into(), vec![&aml::Local(0), &three]);
    let ack_remove = aml::Store::new(&crmv, &one);
    let if_removing = aml::If::new(&removing, vec![&tell_remove, &ack_remove]);
    let next = aml::Add::new(&aml::Local(0), &aml::Local(0), &one);
    let max = usize::from(max_vcpus);
    let more = aml::LessThan::new(&aml::Local(0), &max);
    let walk = aml::While::new(&more, vec![&select_l0, &if_inserting, &if_removing, &next]);
    let cscn = aml::Method::new(
        "CSCN".into(),
        0,
        true,
        vec![&lock_sc, &zero_l0, &walk, &unlock_sc],
    );

    RawAml(bytes_of(&aml::Device::new(
        "_SB_.PRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &"CPU Hotplug Controller"),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Mutex::new("CPLK".into(), 0),
            &aml::OpRegion::new(
                "PRST".into(),
                aml::OpRegionSpace::SystemMemory,
                &start,
                &len,
            ),
            &aml::Field::new(
                "PRST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![
                    aml::FieldEntry::Reserved(STATUS_OFFSET as usize * 8),
                    aml::FieldEntry::Named(*b"CPEN", 1),
                    aml::FieldEntry::Named(*b"CINS", 1),
                    aml::FieldEntry::Named(*b"CRMV", 1),
                    aml::FieldEntry::Named(*b"CEJ0", 1),
                    aml::FieldEntry::Reserved(4),
                ],
            ),
            &aml::Field::new(
                "PRST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![
                    aml::FieldEntry::Reserved(CSEL_OFFSET as usize * 8),
                    aml::FieldEntry::Named(*b"CSEL", 32),
                ],
            ),
            &csta,
            &cej0,
            &cscn,
        ],
    )))
}

/// The processor container: one ACPI0007 device per vCPU slot (`_UID` = the MADT's processor
/// id), each with `_STA`, `_MAT` and `_EJ0` through the hotplug controller, and `CTFY`, which
/// notifies slot Arg0's device with Arg1.
fn processors_aml(max_vcpus: u8) -> RawAml {
    let cpus: Vec<RawAml> = (0..max_vcpus)
        .map(|i| {
            let uid = usize::from(i);
            let slot = usize::from(i);
            let sta_call = aml::MethodCall::new("\\_SB_.PRES.CSTA".into(), vec![&slot]);
            let sta_ret = aml::Return::new(&sta_call);
            let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_ret]);
            // The MADT's Processor Local APIC entry for this slot, enabled: what the guest
            // maps a hot-added CPU with.
            let lapic = aml::BufferData::new(vec![0, 8, i, i, 1, 0, 0, 0]);
            let mat_ret = aml::Return::new(&lapic);
            let mat = aml::Method::new("_MAT".into(), 0, false, vec![&mat_ret]);
            let ej_call = aml::MethodCall::new("\\_SB_.PRES.EJCT".into(), vec![&slot]);
            let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&ej_call]);
            RawAml(bytes_of(&aml::Device::new(
                format!("C{i:03X}").as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &"ACPI0007"),
                    &aml::Name::new("_UID".into(), &uid),
                    &sta,
                    &mat,
                    &ej0,
                ],
            )))
        })
        .collect();
    let notifies: Vec<RawAml> = (0..max_vcpus)
        .map(|i| {
            let slot = usize::from(i);
            let dev = aml::Path::new(format!("C{i:03X}").as_str());
            let notify = aml::Notify::new(&dev, &aml::Arg(1));
            let is_slot = aml::Equal::new(&aml::Arg(0), &slot);
            RawAml(bytes_of(&aml::If::new(&is_slot, vec![&notify])))
        })
        .collect();
    let notify_refs: Vec<&dyn Aml> = notifies.iter().map(|n| n as &dyn Aml).collect();
    let ctfy = aml::Method::new("CTFY".into(), 2, false, notify_refs);
    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid];
    for c in &cpus {
        children.push(c);
    }
    children.push(&ctfy);
    RawAml(bytes_of(&aml::Device::new("_SB_.CPUS".into(), children)))
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton);
    b.reset_reg = io_gas(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    b.sleep_control_reg = io_gas(ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_gas(ACPI_SLEEP_STATUS_PORT);
    // "VGA not present" and "MSI not supported" in IAPC_BOOT_ARCH; no i8042 probe either.
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 3)).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"FLEETVMM").into();
    bytes_of(&b.finalize())
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for i in 0..cfg.max_vcpus {
        let status = if i < cfg.vcpus {
            EnabledStatus::Enabled
        } else {
            EnabledStatus::DisabledOnlineCapable
        };
        m.add_structure(ProcessorLocalApic::new(i, i, status));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes_of(&m)
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Builds every table and lays them out from `ACPI_START`.
pub fn build(cfg: &AcpiConfig) -> AcpiTables {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + 2 entries (FADT, MADT).
    let dsdt_addr = align16(xsdt_addr + 36 + 2 * 8);
    let dsdt = dsdt(cfg);
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = madt(cfg);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    AcpiTables {
        rsdp_addr,
        tables: vec![
            (rsdp_addr, bytes_of(&rsdp)),
            (xsdt_addr, bytes_of(&xsdt)),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
        ],
    }
}

impl AcpiTables {
    /// Writes the tables to guest memory; fails if they outgrow the ACPI area.
    pub fn write(&self, mem: &GuestMemory) -> Result<(), GuestMemoryError> {
        for (addr, bytes) in &self.tables {
            if addr + bytes.len() as u64 > ACPI_END {
                return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(*addr)));
            }
            mem.write_slice(bytes, GuestAddress(*addr))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_consistent() {
        let cfg = AcpiConfig {
            vcpus: 2,
            max_vcpus: 4,
            virtio: vec![MmioDeviceInfo {
                base: VIRTIO_MMIO_START,
                size: VIRTIO_MMIO_SIZE,
                irq: VIRTIO_IRQ_START,
            }],
        };
        let t = build(&cfg);
        for (_, bytes) in &t.tables[1..] {
            assert!(checksum_ok(bytes), "bad checksum in {:?}", &bytes[..4]);
            let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, bytes.len());
        }
        assert!(checksum_ok(&t.tables[0].1[..20]));
        let dsdt = &t.tables[2].1;
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"LNRO0005"));
        assert!(find(b"ACPI0013"));
        assert!(find(b"_S5_"));
        // MADT: 44-byte header, 4 LAPIC entries of 8 bytes, one IOAPIC of 12.
        assert_eq!(t.tables[4].1.len(), 44 + 4 * 8 + 12);
    }
}
