//! The `microfed` command line (being written).
