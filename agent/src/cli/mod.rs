//! The `microfed` command line: one clap-derived `Args` struct and one `run` function per subcommand,
//! each in its own file here. `main` parses, sets up logging, and calls [`run`].

pub mod synth;
