//! Encodings of the NVMe reservation commands and of the Identify fields that
//! announce reservation support; the node's reservation key.
//!
//! All byte offsets and bit positions are those of the NVM Express Base
//! Specification (revision 2.0; the same in 1.4 where the command existed), in
//! the sections named beside each function: "Reservation Register command",
//! "Reservation Acquire command", "Reservation Release command",
//! "Reservation Report command" (I/O commands), "Identify Controller data
//! structure" (ONCS), and the NVM Command Set Specification's "Identify
//! Namespace data structure" (RESCAP). Multi-byte fields are little-endian.
//!
//! Pure: no I/O. The encoders produce a [`PassthruCmd`] (without `addr` and
//! `data_len`, which the submitter fills in) plus its data buffer; the
//! decoders are used by [`super::fake`] and by the tests, so a command and its
//! reading by the fake device agree byte for byte with the tables.

use super::passthru::PassthruCmd;
use super::NvmeError;
use crate::core::reservation::{Key, Registrant, ResvStatus, ResvType};

/// Opcodes (NVM Command Set I/O commands, "Opcodes for I/O Commands").
pub const OPC_RESV_REGISTER: u8 = 0x0d;
pub const OPC_RESV_REPORT: u8 = 0x0e;
pub const OPC_RESV_ACQUIRE: u8 = 0x11;
pub const OPC_RESV_RELEASE: u8 = 0x15;
/// Admin opcode Identify.
pub const OPC_IDENTIFY: u8 = 0x06;
/// Identify CNS values.
pub const CNS_NAMESPACE: u32 = 0x00;
pub const CNS_CONTROLLER: u32 = 0x01;
/// Size of an Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Reservation Register Action (RREGA, cdw10 bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterAction {
    Register = 0,
    Unregister = 1,
    Replace = 2,
}

/// Reservation Acquire Action (RACQA, cdw10 bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireAction {
    Acquire = 0,
    Preempt = 1,
    PreemptAndAbort = 2,
}

/// Reservation Release Action (RRELA, cdw10 bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseAction {
    Release = 0,
    Clear = 1,
}

/// Change Persist Through Power Loss State (CPTPL, Register cdw10 bits 31:30).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cptpl {
    /// 00b: no change.
    NoChange = 0,
    /// 10b: reservations are released and registrants cleared on power loss.
    Clear = 2,
    /// 11b: reservations and registrants persist across power loss.
    Set = 3,
}

/// A command ready to submit: its name (for messages), the command dwords and
/// the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub name: &'static str,
    pub cmd: PassthruCmd,
    pub data: Vec<u8>,
}

/// Reservation Register ("Reservation Register command": cdw10 bits 2:0
/// RREGA, bit 3 IEKEY, bits 31:30 CPTPL; data structure bytes 07:00 CRKEY,
/// 15:08 NRKEY).
pub fn register(
    nsid: u32,
    action: RegisterAction,
    iekey: bool,
    cptpl: Cptpl,
    crkey: Key,
    nrkey: Key,
) -> Encoded {
    let mut data = vec![0u8; 16];
    data[0..8].copy_from_slice(&crkey.to_le_bytes());
    data[8..16].copy_from_slice(&nrkey.to_le_bytes());
    Encoded {
        name: "Reservation Register",
        cmd: PassthruCmd {
            opcode: OPC_RESV_REGISTER,
            nsid,
            cdw10: (action as u32) | (u32::from(iekey) << 3) | ((cptpl as u32) << 30),
            ..PassthruCmd::default()
        },
        data,
    }
}

/// Reservation Acquire ("Reservation Acquire command": cdw10 bits 2:0 RACQA,
/// bit 3 IEKEY, bits 15:08 RTYPE; data structure bytes 07:00 CRKEY, 15:08
/// PRKEY).
pub fn acquire(
    nsid: u32,
    action: AcquireAction,
    rtype: ResvType,
    crkey: Key,
    prkey: Key,
) -> Encoded {
    let mut data = vec![0u8; 16];
    data[0..8].copy_from_slice(&crkey.to_le_bytes());
    data[8..16].copy_from_slice(&prkey.to_le_bytes());
    Encoded {
        name: "Reservation Acquire",
        cmd: PassthruCmd {
            opcode: OPC_RESV_ACQUIRE,
            nsid,
            cdw10: (action as u32) | ((rtype.code() as u32) << 8),
            ..PassthruCmd::default()
        },
        data,
    }
}

/// Reservation Release ("Reservation Release command": cdw10 bits 2:0 RRELA,
/// bit 3 IEKEY, bits 15:08 RTYPE; data structure bytes 07:00 CRKEY).
pub fn release(nsid: u32, action: ReleaseAction, rtype: ResvType, crkey: Key) -> Encoded {
    Encoded {
        name: "Reservation Release",
        cmd: PassthruCmd {
            opcode: OPC_RESV_RELEASE,
            nsid,
            cdw10: (action as u32) | ((rtype.code() as u32) << 8),
            ..PassthruCmd::default()
        },
        data: crkey.to_le_bytes().to_vec(),
    }
}

/// Size of the Reservation Report buffer asked for: the 64-byte extended
/// header plus 64 registered controllers of 64 bytes.
pub const REPORT_LEN: usize = 64 + 64 * 64;

/// Reservation Report with the extended data structure ("Reservation Report
/// command": cdw10 NUMDL = number of dwords, 0's based; cdw11 bit 0 EDS).
pub fn report(nsid: u32, len: usize) -> Encoded {
    Encoded {
        name: "Reservation Report",
        cmd: PassthruCmd {
            opcode: OPC_RESV_REPORT,
            nsid,
            cdw10: (len / 4) as u32 - 1,
            cdw11: 1,
            ..PassthruCmd::default()
        },
        data: vec![0u8; len],
    }
}

/// Identify (admin; cdw10 bits 7:0 CNS).
pub fn identify(nsid: u32, cns: u32) -> Encoded {
    Encoded {
        name: if cns == CNS_CONTROLLER {
            "Identify Controller"
        } else {
            "Identify Namespace"
        },
        cmd: PassthruCmd {
            opcode: OPC_IDENTIFY,
            nsid,
            cdw10: cns,
            ..PassthruCmd::default()
        },
        data: vec![0u8; IDENTIFY_LEN],
    }
}

/// Offsets of the Reservation Status Extended Data Structure ("Reservation
/// Report command", figures "Reservation Status Extended Data Structure" and
/// "Registered Controller Extended Data Structure").
pub mod report_layout {
    /// Bytes 03:00 GEN.
    pub const GEN: usize = 0;
    /// Byte 04 RTYPE.
    pub const RTYPE: usize = 4;
    /// Bytes 06:05 REGCTL (number of registered controllers).
    pub const REGCTL: usize = 5;
    /// Byte 09 PTPLS.
    pub const PTPLS: usize = 9;
    /// The extended header is 64 bytes (bytes 63:24 reserved).
    pub const HEADER: usize = 64;
    /// Each Registered Controller Extended Data Structure is 64 bytes.
    pub const ENTRY: usize = 64;
    /// Entry bytes 01:00 CNTLID.
    pub const E_CNTLID: usize = 0;
    /// Entry byte 02 RCSTS (bit 0: host holds the reservation).
    pub const E_RCSTS: usize = 2;
    /// Entry bytes 15:08 RKEY.
    pub const E_RKEY: usize = 8;
    /// Entry bytes 31:16 HOSTID (128-bit).
    pub const E_HOSTID: usize = 16;
}

/// Decodes a Reservation Report (extended data structure). Entries beyond the
/// buffer (more registrants than asked for) are left out; the caller may ask
/// again with a larger buffer if `REGCTL` says so.
pub fn decode_report(buf: &[u8]) -> Result<ResvStatus, NvmeError> {
    use report_layout::*;
    if buf.len() < HEADER {
        return Err(NvmeError::Malformed {
            command: "Reservation Report",
            detail: format!("{} bytes, need at least {HEADER}", buf.len()),
        });
    }
    let regctl = u16::from_le_bytes([buf[REGCTL], buf[REGCTL + 1]]) as usize;
    let fit = (buf.len() - HEADER) / ENTRY;
    let registrants = (0..regctl.min(fit))
        .map(|i| {
            let e = &buf[HEADER + i * ENTRY..HEADER + (i + 1) * ENTRY];
            let mut host_id = [0u8; 16];
            host_id.copy_from_slice(&e[E_HOSTID..E_HOSTID + 16]);
            Registrant {
                cntlid: u16::from_le_bytes([e[E_CNTLID], e[E_CNTLID + 1]]),
                holds: e[E_RCSTS] & 1 == 1,
                key: u64::from_le_bytes(e[E_RKEY..E_RKEY + 8].try_into().expect("8 bytes")),
                host_id,
            }
        })
        .collect();
    Ok(ResvStatus {
        generation: u32::from_le_bytes(buf[GEN..GEN + 4].try_into().expect("4 bytes")),
        rtype: ResvType::from_code(buf[RTYPE]),
        ptpl: buf[PTPLS] & 1 == 1,
        registrants,
    })
}

/// Encodes a Reservation Report into `buf` (the fake device's side). Returns
/// how many entries fitted.
pub fn encode_report(status: &ResvStatus, buf: &mut [u8]) -> usize {
    use report_layout::*;
    buf.fill(0);
    if buf.len() < HEADER {
        return 0;
    }
    buf[GEN..GEN + 4].copy_from_slice(&status.generation.to_le_bytes());
    buf[RTYPE] = status.rtype.map_or(0, ResvType::code);
    buf[REGCTL..REGCTL + 2].copy_from_slice(&(status.registrants.len() as u16).to_le_bytes());
    buf[PTPLS] = u8::from(status.ptpl);
    let fit = ((buf.len() - HEADER) / ENTRY).min(status.registrants.len());
    for (i, r) in status.registrants.iter().take(fit).enumerate() {
        let e = &mut buf[HEADER + i * ENTRY..HEADER + (i + 1) * ENTRY];
        e[E_CNTLID..E_CNTLID + 2].copy_from_slice(&r.cntlid.to_le_bytes());
        e[E_RCSTS] = u8::from(r.holds);
        e[E_RKEY..E_RKEY + 8].copy_from_slice(&r.key.to_le_bytes());
        e[E_HOSTID..E_HOSTID + 16].copy_from_slice(&r.host_id);
    }
    fit
}

/// The fields of a reservation command as the device reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    /// cdw10 bits 2:0 (RREGA / RACQA / RRELA).
    pub action: u8,
    /// cdw10 bit 3.
    pub iekey: bool,
    /// cdw10 bits 15:08 (Acquire, Release).
    pub rtype: u8,
    /// cdw10 bits 31:30 (Register).
    pub cptpl: u8,
    /// Data bytes 07:00.
    pub crkey: Key,
    /// Data bytes 15:08 (NRKEY for Register, PRKEY for Acquire), 0 if absent.
    pub second_key: Key,
}

/// Reads the fields of a Register / Acquire / Release command.
pub fn decode_fields(cmd: &PassthruCmd, data: &[u8]) -> Fields {
    let key = |r: std::ops::Range<usize>| {
        data.get(r)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    Fields {
        action: (cmd.cdw10 & 0x7) as u8,
        iekey: cmd.cdw10 & 0x8 != 0,
        rtype: ((cmd.cdw10 >> 8) & 0xff) as u8,
        cptpl: (cmd.cdw10 >> 30) as u8,
        crkey: key(0..8),
        second_key: key(8..16),
    }
}

/// Byte offset of ONCS (Optional NVM Command Support, bytes 521:520) in the
/// Identify Controller data structure; bit 5 = Reservations supported.
pub const ONCS_OFFSET: usize = 520;
pub const ONCS_RESERVATIONS: u16 = 1 << 5;
/// Byte offset of RESCAP (Reservation Capabilities, byte 31) in the Identify
/// Namespace data structure (NVM Command Set). Bit 0 PTPL, bit 1 Write
/// Exclusive, bit 2 Exclusive Access, bits 3-6 the registrants-only and
/// all-registrants types, bit 7 Ignore Existing Key.
pub const RESCAP_OFFSET: usize = 31;
pub const RESCAP_WRITE_EXCLUSIVE: u8 = 1 << 1;

/// What Identify says about reservations on this namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Support {
    /// ONCS bit 5 of the controller.
    pub controller: bool,
    /// RESCAP of the namespace (0 = no reservation types).
    pub rescap: u8,
}

impl Support {
    /// Decodes the two Identify buffers.
    pub fn decode(id_ctrl: &[u8], id_ns: &[u8]) -> Support {
        let oncs = id_ctrl
            .get(ONCS_OFFSET..ONCS_OFFSET + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        Support {
            controller: oncs & ONCS_RESERVATIONS != 0,
            rescap: id_ns.get(RESCAP_OFFSET).copied().unwrap_or(0),
        }
    }

    /// True if Write Exclusive reservations can be used.
    pub fn write_exclusive(&self) -> bool {
        self.controller && self.rescap & RESCAP_WRITE_EXCLUSIVE != 0
    }

    /// Why not, in words; `None` if supported.
    pub fn reason(&self) -> Option<String> {
        if !self.controller {
            Some("the controller does not support reservations (Identify Controller ONCS bit 5 clear)".into())
        } else if self.rescap & RESCAP_WRITE_EXCLUSIVE == 0 {
            Some(format!(
                "the namespace does not offer Write Exclusive reservations (RESCAP {:#04x})",
                self.rescap
            ))
        } else {
            None
        }
    }
}

/// The reservation key of a node: FNV-1a (64 bit) of
/// `"blockfence/nvme-resv-key/v1:" + node_name`, with 0 (not a valid key)
/// mapped to 1. Stable across versions of this program and of Rust (no std
/// hasher), and unique per node as long as node names are unique (Kubernetes
/// node names are); a collision would need two names with equal 64-bit hashes.
pub fn key_for_node(node_name: &str) -> Key {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "blockfence/nvme-resv-key/v1:"
        .bytes()
        .chain(node_name.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if h == 0 {
        1
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_replace_with_iekey_and_cptpl_set() {
        let e = register(1, RegisterAction::Replace, true, Cptpl::Set, 0, 0xAABB);
        assert_eq!(e.cmd.opcode, 0x0d);
        assert_eq!(e.cmd.nsid, 1);
        // RREGA = 010b, IEKEY bit 3, CPTPL = 11b in bits 31:30.
        assert_eq!(e.cmd.cdw10, 0b010 | 1 << 3 | 0b11 << 30);
        assert_eq!(e.data.len(), 16);
        assert_eq!(&e.data[8..16], &0xAABBu64.to_le_bytes());
        let f = decode_fields(&e.cmd, &e.data);
        assert_eq!(
            (f.action, f.iekey, f.cptpl, f.crkey, f.second_key),
            (2, true, 3, 0, 0xAABB)
        );
        let e = register(7, RegisterAction::Unregister, false, Cptpl::NoChange, 5, 0);
        assert_eq!(e.cmd.cdw10, 1);
        assert_eq!(&e.data[0..8], &5u64.to_le_bytes());
    }

    #[test]
    fn acquire_preempt_and_abort_write_exclusive() {
        let e = acquire(
            3,
            AcquireAction::PreemptAndAbort,
            ResvType::WriteExclusive,
            0x11,
            0x22,
        );
        assert_eq!(e.cmd.opcode, 0x11);
        // RACQA 010b, RTYPE 1 in bits 15:08.
        assert_eq!(e.cmd.cdw10, 0x0102);
        assert_eq!(&e.data[0..8], &0x11u64.to_le_bytes());
        assert_eq!(&e.data[8..16], &0x22u64.to_le_bytes());
        let e = acquire(
            3,
            AcquireAction::Acquire,
            ResvType::ExclusiveAccessAllRegistrants,
            1,
            0,
        );
        assert_eq!(e.cmd.cdw10, 0x0600);
        let e = acquire(3, AcquireAction::Preempt, ResvType::WriteExclusive, 1, 2);
        assert_eq!(e.cmd.cdw10, 0x0101);
    }

    #[test]
    fn release_and_clear() {
        let e = release(1, ReleaseAction::Release, ResvType::WriteExclusive, 9);
        assert_eq!((e.cmd.opcode, e.cmd.cdw10), (0x15, 0x0100));
        assert_eq!(e.data, 9u64.to_le_bytes().to_vec());
        let e = release(1, ReleaseAction::Clear, ResvType::WriteExclusive, 9);
        assert_eq!(e.cmd.cdw10, 0x0101);
    }

    #[test]
    fn report_asks_for_extended_data_with_zero_based_dwords() {
        let e = report(2, REPORT_LEN);
        assert_eq!(e.cmd.opcode, 0x0e);
        assert_eq!(e.cmd.cdw10, (REPORT_LEN / 4 - 1) as u32);
        assert_eq!(e.cmd.cdw11, 1);
        assert_eq!(e.data.len(), REPORT_LEN);
    }

    #[test]
    fn report_decodes_at_the_specified_offsets() {
        let mut buf = vec![0u8; 64 + 2 * 64];
        buf[0..4].copy_from_slice(&7u32.to_le_bytes()); // GEN
        buf[4] = 1; // RTYPE Write Exclusive
        buf[5..7].copy_from_slice(&2u16.to_le_bytes()); // REGCTL
        buf[9] = 1; // PTPLS
                    // entry 0 at byte 64: cntlid 0x0102, not holding, key 0xAA
        buf[64..66].copy_from_slice(&0x0102u16.to_le_bytes());
        buf[64 + 8..64 + 16].copy_from_slice(&0xAAu64.to_le_bytes());
        buf[64 + 16] = 0x42; // host id first byte
                             // entry 1 at byte 128: cntlid 3, holding, key 0xBB
        buf[128..130].copy_from_slice(&3u16.to_le_bytes());
        buf[130] = 1;
        buf[128 + 8..128 + 16].copy_from_slice(&0xBBu64.to_le_bytes());
        let s = decode_report(&buf).unwrap();
        assert_eq!(s.generation, 7);
        assert_eq!(s.rtype, Some(ResvType::WriteExclusive));
        assert!(s.ptpl);
        assert_eq!(s.registrants.len(), 2);
        assert_eq!(s.registrants[0].cntlid, 0x0102);
        assert!(!s.registrants[0].holds);
        assert_eq!(s.registrants[0].key, 0xAA);
        assert_eq!(s.registrants[0].host_id[0], 0x42);
        assert_eq!(s.holder_key(), Some(0xBB));
        // Round trip through the fake's encoder.
        let mut again = vec![0u8; buf.len()];
        encode_report(&s, &mut again);
        assert_eq!(again, buf);
        // No reservation: RTYPE 0 means no holder.
        buf[4] = 0;
        assert_eq!(decode_report(&buf).unwrap().holder_key(), None);
        assert!(decode_report(&buf[..10]).is_err());
    }

    #[test]
    fn report_with_more_registrants_than_fit_keeps_what_fits() {
        let mut buf = vec![0u8; 64 + 64];
        buf[5..7].copy_from_slice(&5u16.to_le_bytes());
        assert_eq!(decode_report(&buf).unwrap().registrants.len(), 1);
    }

    #[test]
    fn support_reads_oncs_bit_5_and_rescap_byte_31() {
        let mut ctrl = vec![0u8; IDENTIFY_LEN];
        let mut ns = vec![0u8; IDENTIFY_LEN];
        assert!(!Support::decode(&ctrl, &ns).write_exclusive());
        ctrl[520] = 0x20;
        assert!(Support::decode(&ctrl, &ns)
            .reason()
            .unwrap()
            .contains("RESCAP"));
        ns[31] = 0x02;
        let s = Support::decode(&ctrl, &ns);
        assert!(s.write_exclusive());
        assert_eq!(s.reason(), None);
        ctrl[520] = 0x1f; // every other ONCS bit, not reservations
        assert!(!Support::decode(&ctrl, &ns).write_exclusive());
        let e = identify(1, CNS_CONTROLLER);
        assert_eq!((e.cmd.opcode, e.cmd.cdw10, e.data.len()), (0x06, 1, 4096));
    }

    #[test]
    fn node_keys_are_stable_distinct_and_never_zero() {
        let a = key_for_node("node-a");
        assert_eq!(a, key_for_node("node-a"));
        assert_ne!(a, key_for_node("node-b"));
        assert_ne!(a, 0);
        // Pinned (FNV-1a 64 computed independently): a change of derivation
        // would strand the keys nodes registered with the old one.
        assert_eq!(key_for_node("node-a"), 0x57de_7eea_ecf6_3a6b);
        let keys: std::collections::HashSet<_> = (0..10_000)
            .map(|i| key_for_node(&format!("n{i}")))
            .collect();
        assert_eq!(keys.len(), 10_000);
    }

    proptest::proptest! {
        #[test]
        fn any_report_buffer_decodes_without_panicking(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = decode_report(&buf);
        }

        #[test]
        fn report_round_trips(gen in proptest::prelude::any::<u32>(), keys in proptest::collection::vec(1u64.., 0..8), holder in 0usize..9) {
            let status = ResvStatus {
                generation: gen,
                rtype: (holder < keys.len()).then_some(ResvType::WriteExclusive),
                ptpl: false,
                registrants: keys.iter().enumerate().map(|(i, &k)| Registrant {
                    cntlid: i as u16,
                    holds: i == holder,
                    key: k,
                    host_id: [i as u8; 16],
                }).collect(),
            };
            let mut buf = vec![0u8; REPORT_LEN];
            encode_report(&status, &mut buf);
            proptest::prop_assert_eq!(decode_report(&buf).unwrap(), status);
        }
    }
}
