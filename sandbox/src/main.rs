//! `ember-vmm --spec FILE`: one sandbox's VMM process, started by `ember serve`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ember-vmm",
    version,
    about = "One ember sandbox's VMM process (started by `ember serve`)"
)]
struct Cli {
    #[command(flatten)]
    args: ember_sandbox::worker::VmmArgs,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    std::process::exit(ember_sandbox::worker::run(cli.args));
}
