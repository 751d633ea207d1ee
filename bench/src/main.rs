//! `ember-bench`: measure cold boot vs restore (each mode), snapshots, exec, density and store
//! sharing through a service it starts; writes JSON, Markdown and SVG charts. `--soak N` runs
//! the long-running leak check instead.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ember-bench",
    version,
    about = "ember's end-to-end benchmark and soak harness (starts its own `ember serve`)"
)]
struct Cli {
    #[command(flatten)]
    args: ember_bench::BenchArgs,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    std::process::exit(ember_bench::run(Cli::parse().args));
}
