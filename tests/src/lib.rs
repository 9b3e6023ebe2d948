//! Shared helpers for the end-to-end tests: locating binaries, starting real processes, polling with deadlines.
