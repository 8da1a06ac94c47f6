//! Block I/O and the lease area on a device.
