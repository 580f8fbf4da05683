// pya2a device pack kernel: the local rearrangement step of a device all-to-all.
//
// One launch copies every block of one step: block i is lens[i] bytes from
// src + src_off[i] to dst + dst_off[i]. The table is int64[3 * n]: src_off[0..n),
// dst_off[0..n), lens[0..n). Grid: x tiles the bytes of a block, y walks the blocks
// (grid-stride in both, so any n and any length fit one launch).
//
// Per block the widest access both pointers allow: 16-byte vectors (uint4) when src and
// dst are equally aligned mod 16 (byte head and tail around the aligned body), 4-byte words
// when equally aligned mod 4, bytes otherwise. Four vectors in flight per thread: loads
// first, then stores, because src and dst may be the same allocation (no __restrict__).
//
// Portable CUDA / HIP source: no intrinsics, no inline assembly, only uint4 from the
// runtime's vector types, so nvrtc and hiprtc both build it.

typedef long long i64;
typedef unsigned long long u64;

template <typename T>
__device__ __forceinline__ void copy_words(const T* s, T* d, i64 n, i64 tid, i64 nth) {
    i64 k = tid;
    for (; k + 3 * nth < n; k += 4 * nth) {
        T a = s[k];
        T b = s[k + nth];
        T c = s[k + 2 * nth];
        T e = s[k + 3 * nth];
        d[k] = a;
        d[k + nth] = b;
        d[k + 2 * nth] = c;
        d[k + 3 * nth] = e;
    }
    for (; k < n; k += nth) {
        d[k] = s[k];
    }
}

__device__ __forceinline__ void copy_bytes(const unsigned char* s, unsigned char* d, i64 lo,
                                           i64 hi, i64 tid, i64 nth) {
    for (i64 k = lo + tid; k < hi; k += nth) {
        d[k] = s[k];
    }
}

template <typename T>
__device__ __forceinline__ void copy_aligned(const unsigned char* s, unsigned char* d,
                                             i64 len, i64 tid, i64 nth) {
    const i64 w = (i64)sizeof(T);
    i64 head = (w - (i64)((u64)s % (u64)w)) % w;
    if (head > len) head = len;
    copy_bytes(s, d, 0, head, tid, nth);
    const i64 nw = (len - head) / w;
    copy_words<T>((const T*)(s + head), (T*)(d + head), nw, tid, nth);
    copy_bytes(s, d, head + nw * w, len, tid, nth);
}

extern "C" __global__ void pya2a_pack(const unsigned char* src, const i64* tab,
                                      unsigned char* dst, int n) {
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 nth = (i64)gridDim.x * blockDim.x;
    for (i64 i = blockIdx.y; i < n; i += gridDim.y) {
        const i64 len = tab[2 * (i64)n + i];
        if (len <= 0) continue;
        const unsigned char* s = src + tab[i];
        unsigned char* d = dst + tab[(i64)n + i];
        if (s == d) continue;
        const u64 sa = (u64)s, da = (u64)d;
        if (((sa ^ da) & 15) == 0) {
            copy_aligned<uint4>(s, d, len, tid, nth);
        } else if (((sa ^ da) & 3) == 0) {
            copy_aligned<unsigned int>(s, d, len, tid, nth);
        } else {
            copy_bytes(s, d, 0, len, tid, nth);
        }
    }
}
