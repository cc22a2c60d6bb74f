//! `waypoint-conformance`: the demo, the conformance runner, and (for tests that need the waypoint as a child
//! process) the waypoint itself under the `waypoint` subcommand.

use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // `waypoint-conformance waypoint run --config F` runs the real waypoint CLI, so integration tests get a
    // waypoint binary that cargo is guaranteed to have built for them.
    if args.get(1).is_some_and(|a| a == "waypoint") {
        args.remove(0);
        return waypoint::cli_main(args);
    }
    waypoint_conformance::cli::main(args)
}
