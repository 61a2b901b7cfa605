//! The embedded store (redb) — being written.
