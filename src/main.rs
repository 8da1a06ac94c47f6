fn main() {
    println!("blockfence");
}
