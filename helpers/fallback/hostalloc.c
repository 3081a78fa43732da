/*
 * hostalloc.c: the allocator behind the course's Linux emulation of NVIDIA's Windows "sysmem fallback".
 *
 * Every block it hands out is *mapped, pinned host memory*: cudaHostAlloc(..., cudaHostAllocMapped) gives page-locked
 * system RAM that the GPU can address, and cudaHostGetDevicePointer gives the address GPU kernels use for it. A
 * tensor placed here lives in system RAM; a kernel that reads it pulls every byte over PCIe, which is what the
 * Windows driver does with allocations it has moved into "shared GPU memory".
 *
 * torch loads this library through torch.cuda.memory.CUDAPluggableAllocator and the course uses it only inside
 * `with torch.cuda.use_mem_pool(pool)`, so only the tensors created there (the modules routed past the emulated VRAM
 * budget, with their cache layers) come from here; every other allocation keeps torch's own caching allocator.
 *
 * The library keeps a table of what it handed out, so Python can check that nothing pinned is left behind
 * (hostalloc_outstanding_*) and, as a last resort, free everything (hostalloc_free_all). There is deliberately no
 * destructor: at process exit the driver reclaims pinned memory itself, and CUDA calls made while the runtime is
 * being torn down can hang.
 *
 * No CUDA header is needed: the six runtime functions used are declared below with their documented C signatures,
 * so the file builds with any C compiler (or nvcc) linked against the libcudart that torch already loaded.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#if defined(__CUDACC__) || defined(HOSTALLOC_USE_CUDA_HEADERS)
#include <cuda_runtime_api.h>
#else
typedef int cudaError_t; /* an enum in cuda_runtime_api.h; 0 is cudaSuccess */
typedef void *cudaStream_t;
extern cudaError_t cudaHostAlloc(void **pHost, size_t size, unsigned int flags);
extern cudaError_t cudaHostGetDevicePointer(void **pDevice, void *pHost, unsigned int flags);
extern cudaError_t cudaFreeHost(void *ptr);
extern cudaError_t cudaGetLastError(void);
extern cudaError_t cudaDeviceSynchronize(void);
#endif
#define HA_cudaSuccess 0
#define HA_cudaHostAllocPortable 0x01
#define HA_cudaHostAllocMapped 0x02

#ifdef __cplusplus
#define HA_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define HA_EXPORT __attribute__((visibility("default")))
#endif

typedef struct {
    void *dev;   /* what torch and the kernels see */
    void *host;  /* what cudaFreeHost needs */
    size_t size;
} ha_block;

static pthread_mutex_t ha_lock = PTHREAD_MUTEX_INITIALIZER;
static ha_block *ha_blocks = NULL;
static size_t ha_count = 0, ha_cap = 0;
static size_t ha_bytes = 0, ha_peak = 0, ha_total_allocs = 0, ha_failed = 0;
static int ha_last_error = 0;

static int ha_push(void *dev, void *host, size_t size) {
    if (ha_count == ha_cap) {
        size_t cap = ha_cap ? ha_cap * 2 : 256;
        ha_block *grown = (ha_block *)realloc(ha_blocks, cap * sizeof(ha_block));
        if (!grown) return 0;
        ha_blocks = grown;
        ha_cap = cap;
    }
    ha_blocks[ha_count].dev = dev;
    ha_blocks[ha_count].host = host;
    ha_blocks[ha_count].size = size;
    ha_count++;
    ha_bytes += size;
    if (ha_bytes > ha_peak) ha_peak = ha_bytes;
    ha_total_allocs++;
    return 1;
}

/* torch's alloc_fn: void* alloc(size_t size, int device, cudaStream_t stream). NULL tells torch it failed. */
HA_EXPORT void *hostalloc_alloc(size_t size, int device, cudaStream_t stream) {
    void *host = NULL, *dev = NULL;
    cudaError_t err;
    (void)device;
    (void)stream;
    if (size == 0) size = 1;
    err = cudaHostAlloc(&host, size, HA_cudaHostAllocMapped | HA_cudaHostAllocPortable);
    if (err != HA_cudaSuccess || host == NULL) {
        cudaGetLastError(); /* clear the sticky-free error so torch can report its own OOM */
        pthread_mutex_lock(&ha_lock);
        ha_failed++;
        ha_last_error = (int)err;
        pthread_mutex_unlock(&ha_lock);
        return NULL;
    }
    err = cudaHostGetDevicePointer(&dev, host, 0);
    if (err != HA_cudaSuccess || dev == NULL) {
        cudaGetLastError();
        cudaFreeHost(host);
        pthread_mutex_lock(&ha_lock);
        ha_failed++;
        ha_last_error = (int)err;
        pthread_mutex_unlock(&ha_lock);
        return NULL;
    }
    pthread_mutex_lock(&ha_lock);
    if (!ha_push(dev, host, size)) {
        pthread_mutex_unlock(&ha_lock);
        cudaFreeHost(host);
        return NULL;
    }
    pthread_mutex_unlock(&ha_lock);
    return dev;
}

/* torch's free_fn: void free(void* ptr, size_t size, int device, cudaStream_t stream). */
HA_EXPORT void hostalloc_free(void *ptr, size_t size, int device, cudaStream_t stream) {
    size_t i;
    void *host = NULL;
    (void)size;
    (void)device;
    (void)stream;
    if (ptr == NULL) return;
    pthread_mutex_lock(&ha_lock);
    for (i = ha_count; i-- > 0;) {
        if (ha_blocks[i].dev == ptr) {
            host = ha_blocks[i].host;
            ha_bytes -= ha_blocks[i].size;
            ha_blocks[i] = ha_blocks[ha_count - 1];
            ha_count--;
            break;
        }
    }
    pthread_mutex_unlock(&ha_lock);
    if (host != NULL) cudaFreeHost(host); /* cudaFreeHost waits for work still using the block */
}

/* Bookkeeping read from Python through ctypes. */
HA_EXPORT size_t hostalloc_outstanding_bytes(void) {
    size_t v;
    pthread_mutex_lock(&ha_lock);
    v = ha_bytes;
    pthread_mutex_unlock(&ha_lock);
    return v;
}

HA_EXPORT size_t hostalloc_outstanding_count(void) {
    size_t v;
    pthread_mutex_lock(&ha_lock);
    v = ha_count;
    pthread_mutex_unlock(&ha_lock);
    return v;
}

HA_EXPORT size_t hostalloc_peak_bytes(void) { return ha_peak; }
HA_EXPORT size_t hostalloc_total_allocs(void) { return ha_total_allocs; }
HA_EXPORT size_t hostalloc_failed_allocs(void) { return ha_failed; }
HA_EXPORT int hostalloc_last_error(void) { return ha_last_error; }

HA_EXPORT void hostalloc_reset_peak(void) {
    pthread_mutex_lock(&ha_lock);
    ha_peak = ha_bytes;
    pthread_mutex_unlock(&ha_lock);
}

/* Last resort: free every block still held (any tensor still pointing into one is invalid afterwards).
 * Returns how many blocks were freed. */
HA_EXPORT size_t hostalloc_free_all(void) {
    size_t n, i;
    ha_block *blocks;
    pthread_mutex_lock(&ha_lock);
    blocks = ha_blocks;
    n = ha_count;
    ha_blocks = NULL;
    ha_count = ha_cap = 0;
    ha_bytes = 0;
    pthread_mutex_unlock(&ha_lock);
    if (n) cudaDeviceSynchronize();
    for (i = 0; i < n; i++) cudaFreeHost(blocks[i].host);
    free(blocks);
    return n;
}
