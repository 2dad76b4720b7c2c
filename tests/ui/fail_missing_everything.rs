use twilight::twilight_kernel;

#[twilight_kernel]
pub struct Kernel;

fn main() {}
