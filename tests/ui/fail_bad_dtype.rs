use twilight::twilight_kernel;

#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f32, group_size = 4, selector = quest, pruning = top_p)]
pub struct Kernel;

fn main() {}
