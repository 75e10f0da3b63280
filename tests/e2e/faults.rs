//! Fault injection and the load and end check the fault suite runs (issue 20).
