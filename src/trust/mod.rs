//! Trust anchors over time: the rotation state machine and its journal.
//!
//! Owns: which roots are in the bundle and which one signs (`rotation`), and
//! persisting that state so a crash resumes exactly where it stopped
//! (`journal`). Not yet wired into `serve` (issue 3 is in progress): today
//! the CA runs with the single root of its data directory.

pub mod journal;
pub mod rotation;
pub mod status;
