use twilight::twilight_kernel;

#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4, selector = double_sparse, pruning = top_p)]
pub struct Kernel;

fn main() {}
