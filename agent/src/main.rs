fn main() {
    println!("microfed {}", env!("CARGO_PKG_VERSION"));
}
