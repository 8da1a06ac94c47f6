//! The pure core: lease protocol, records and parameters.
//!
//! Nothing in here performs I/O, reads a clock, sleeps or spawns. Every function
//! takes the current time and the observations as arguments, so the simulation
//! in `tests/sim.rs` can drive many nodes over one simulated disk
//! deterministically.

pub mod fence;
pub mod holder;
pub mod lease;
pub mod params;
pub mod record;
pub mod reservation;
pub mod session;
pub mod watchdog;
