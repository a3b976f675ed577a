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

/// Builds the DSDT body: COM1, the power button and GED, the processors, virtio-mmio devices, \_S5.
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
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    // Processors: a container with one ACPI0007 device per present vCPU; `_UID` matches the MADT.
    let cpus: Vec<RawAml> = (0..cfg.vcpus)
        .map(|i| {
            let uid = i as usize;
            RawAml(bytes_of(&aml::Device::new(
                format!("C{i:03X}").as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &"ACPI0007"),
                    &aml::Name::new("_UID".into(), &uid),
                ],
            )))
        })
        .collect();
    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let mut cpu_children: Vec<&dyn Aml> = vec![&hid, &cid];
    for c in &cpus {
        cpu_children.push(c);
    }
    aml::Device::new("_SB_.CPUS".into(), cpu_children).to_aml_bytes(&mut body);

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
