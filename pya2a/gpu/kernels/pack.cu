// pya2a device pack kernel: the local rearrangement step of a device all-to-all.
//
// One launch copies every block of one step: block i is lens[i] bytes from
// src + src_off[i] to dst + dst_off[i]. The table is int64[3 * n]: src_off[0..n),
// dst_off[0..n), lens[0..n). Grid: x tiles the bytes of a block, y walks the blocks
// (grid-stride in both, so any n and any length fit one launch). Each block is copied
// with span_copy (pya2a_device.cuh): the widest access both pointers allow, four vectors
// in flight per thread, loads before stores (src and dst may be the same allocation).

#include "pya2a_device.cuh"

extern "C" __global__ void pya2a_pack(const char* src, const i64* tab, char* dst, int n) {
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 nth = (i64)gridDim.x * blockDim.x;
    for (i64 i = blockIdx.y; i < n; i += gridDim.y) {
        const i64 len = tab[2 * (i64)n + i];
        if (len <= 0) continue;
        const char* s = src + tab[i];
        char* d = dst + tab[(i64)n + i];
        if (s == d) continue;
        span_copy(d, s, len, tid, nth);
    }
}
