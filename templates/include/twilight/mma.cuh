// Tensor-core and asynchronous-copy building blocks (sm_80 and later), shared by the estimate
// and the attention. Fragment layouts follow the PTX ISA's mma.m16n8k16, lane = 4 * g + t:
// A a0 = row g, columns (2t, 2t+1), a1 = row g+8, a2 / a3 = rows g / g+8, columns (2t+8, 2t+9);
// B b0 = rows (2t, 2t+1), b1 = rows (2t+8, 2t+9), column g; C c0, c1 = row g, columns
// (2t, 2t+1), c2, c3 = row g+8. The lower column (A) or row (B) sits in a register's low half.

// d += a * b for one m16n8k16 tile (A 16x16 row-major, B 16x8 column-major, f32 accumulators);
// the tag picks the f16 or the bf16 instruction.
TW_DEVICE void tw_mma_m16n8k16(float (&d)[4], const tw_u32 (&a)[4], uint2 b, half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}
TW_DEVICE void tw_mma_m16n8k16(float (&d)[4], const tw_u32 (&a)[4], uint2 b, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}

// d += a * b for one m16n8k32 tile of 8-bit integers (A 16x32 unsigned, row-major; B 32x8
// signed, column-major; 32-bit accumulators). Fragments as for m16n8k16 with four elements per
// register: A a0 = row g, columns 4t..4t+3, a1 = row g+8, a2 / a3 = columns 16+4t..16+4t+3;
// B b0 = rows 4t..4t+3, b1 = rows 16+4t..16+4t+3; the lowest index in a register's low byte.
TW_DEVICE void tw_mma_m16n8k32_u8s8(int (&d)[4], const tw_u32 (&a)[4], uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 "
      "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}

// Two floats rounded into one register of two 16-bit operands (x in the low half).
TW_DEVICE tw_u32 tw_pack_pair(float x, float y, half) {
  const half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const tw_u32*>(&h);
}
TW_DEVICE tw_u32 tw_pack_pair(float x, float y, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const tw_u32*>(&h);
}

TW_DEVICE unsigned tw_shared_address(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// Four 8x8 matrices of 16-bit elements from shared memory into A-fragment registers: lanes
// 8i..8i+7 give the addresses of matrix i's eight 16-byte rows. With `trans`, each lane gets
// the transposed matrix's elements, so rows stored token-major arrive channel-major.
TW_DEVICE void tw_ldmatrix_x4(tw_u32 (&r)[4], unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 { %0, %1, %2, %3 }, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
TW_DEVICE void tw_ldmatrix_x4_trans(tw_u32 (&r)[4], unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 { %0, %1, %2, %3 }, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// The transpose of an 8x8 matrix of 16-bit elements held one row per four lanes (lane 4g + t
// holds row g, columns 2t and 2t+1): turns an accumulator's rows into a B operand's columns
// without a trip through shared memory.
TW_DEVICE tw_u32 tw_movmatrix_trans(tw_u32 x) {
  tw_u32 y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// 16 bytes from global to shared memory without passing through registers (cached in L2
// only: K and V are streamed once). A copy with `valid` false reads nothing and writes zeros.
TW_DEVICE void tw_copy_async_16(unsigned shared_address, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(global),
               "r"(valid ? 16 : 0)
               : "memory");
}
// 4 bytes the same way (4-byte copies go through L1: only 16-byte ones may skip it).
TW_DEVICE void tw_copy_async_4(unsigned shared_address, const void* global, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address), "l"(global), "r"(valid ? 4 : 0)
               : "memory");
}
TW_DEVICE void tw_copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
TW_DEVICE void tw_copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
