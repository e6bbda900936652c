fn main() {
    eprintln!("kubectl-crac: not built yet");
    std::process::exit(2);
}
