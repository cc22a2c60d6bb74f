fn main() -> std::process::ExitCode {
    waypoint::cli_main(std::env::args_os().collect())
}
