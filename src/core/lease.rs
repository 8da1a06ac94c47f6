//! The lease protocol state machine (written next).
