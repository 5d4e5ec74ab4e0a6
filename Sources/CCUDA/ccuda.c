// dlopen/dlsym of the CUDA driver, cuBLAS, NVRTC and NCCL (see include/ccuda.h).
#include "ccuda.h"
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const cuda_dirs[] = {
    "/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/local/cuda-13.0/targets/x86_64-linux/lib", "/usr/local/cuda-13.0/lib64",
    "/usr/local/cuda-12/lib64", "/usr/lib/x86_64-linux-gnu", NULL};

// Opens the first of `names` found by the loader's search, then in QAT_CUDA_LIB_DIR and the
// usual CUDA folders. RTLD_GLOBAL so that a library's own dependencies (cuBLASLt) resolve.
static void *open_any(const char *const *names) {
    for (int i = 0; names[i]; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
        if (h) return h;
    }
    char path[1024];
    const char *env = getenv("QAT_CUDA_LIB_DIR");
    for (int d = -1; d < 0 || cuda_dirs[d]; d++) {
        const char *dir = d < 0 ? env : cuda_dirs[d];
        if (!dir) continue;
        for (int i = 0; names[i]; i++) {
            snprintf(path, sizeof path, "%s/%s", dir, names[i]);
            void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
            if (h) return h;
        }
    }
    return NULL;
}

// A library at an explicit `path` (the user's choice: an error names it when it cannot be
// opened), else the first of `names` by open_any; NULL with `err` set when neither works
// (`missing`: the message for a library not found anywhere).
static void *open_path_or_any(const char *path, const char *const *names, const char *what, const char *missing, char *err,
                              size_t errlen) {
    if (path && *path) {
        void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
        if (!h) snprintf(err, errlen, "%s could not be opened from %s: %s", what, path, dlerror());
        return h;
    }
    void *h = open_any(names);
    if (!h) snprintf(err, errlen, "%s", missing);
    return h;
}

#define SYM(h, field, name)                                                             \
    do {                                                                                \
        *(void **)(&api->field) = dlsym(h, name);                                       \
        if (!api->field) {                                                              \
            snprintf(err, errlen, "%s has no symbol %s", lib, name);                    \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

int qat_cuda_load(QATCudaAPI *api, char *err, size_t errlen) {
    memset(api, 0, sizeof *api);
    const char *lib = "libcuda.so.1";
    const char *cuda_names[] = {"libcuda.so.1", "libcuda.so", NULL};
    void *h = open_any(cuda_names);
    if (!h) {
        snprintf(err, errlen, "no CUDA driver found (libcuda.so.1 could not be opened): is this a machine with an NVIDIA GPU and driver?");
        return 1;
    }
    SYM(h, cuInit, "cuInit");
    SYM(h, cuDriverGetVersion, "cuDriverGetVersion");
    SYM(h, cuDeviceGetCount, "cuDeviceGetCount");
    SYM(h, cuDeviceGet, "cuDeviceGet");
    SYM(h, cuDeviceGetName, "cuDeviceGetName");
    SYM(h, cuDeviceGetAttribute, "cuDeviceGetAttribute");
    SYM(h, cuDeviceTotalMem, "cuDeviceTotalMem_v2");
    SYM(h, cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    SYM(h, cuCtxSetCurrent, "cuCtxSetCurrent");
    SYM(h, cuCtxSynchronize, "cuCtxSynchronize");
    SYM(h, cuMemAlloc, "cuMemAlloc_v2");
    SYM(h, cuMemFree, "cuMemFree_v2");
    SYM(h, cuMemGetInfo, "cuMemGetInfo_v2");
    SYM(h, cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    SYM(h, cuMemcpyDtoH, "cuMemcpyDtoH_v2");
    SYM(h, cuMemcpyDtoD, "cuMemcpyDtoD_v2");
    SYM(h, cuMemsetD8, "cuMemsetD8_v2");
    SYM(h, cuModuleLoadData, "cuModuleLoadData");
    SYM(h, cuModuleGetFunction, "cuModuleGetFunction");
    SYM(h, cuFuncSetAttribute, "cuFuncSetAttribute");
    SYM(h, cuLaunchKernel, "cuLaunchKernel");
    SYM(h, cuGetErrorString, "cuGetErrorString");
    // optional: the profiler's events (cuEventElapsedTime_v2 from CUDA 12.8 on, the same signature)
    *(void **)(&api->cuEventCreate) = dlsym(h, "cuEventCreate");
    *(void **)(&api->cuEventRecord) = dlsym(h, "cuEventRecord");
    *(void **)(&api->cuEventSynchronize) = dlsym(h, "cuEventSynchronize");
    *(void **)(&api->cuEventElapsedTime) = dlsym(h, "cuEventElapsedTime_v2");
    if (!api->cuEventElapsedTime) *(void **)(&api->cuEventElapsedTime) = dlsym(h, "cuEventElapsedTime");
    *(void **)(&api->cuEventDestroy) = dlsym(h, "cuEventDestroy_v2");
    lib = "cuBLAS";
    const char *lt_names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so", NULL};
    (void)open_any(lt_names);  // so that libcublas finds its dependency by soname
    const char *blas_names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so", NULL};
    void *b = open_any(blas_names);
    if (!b) {
        snprintf(err, errlen, "cuBLAS not found (libcublas.so.13 or .12): install the CUDA toolkit's cuBLAS or set QAT_CUDA_LIB_DIR");
        return 1;
    }
    SYM(b, cublasCreate, "cublasCreate_v2");
    SYM(b, cublasSetMathMode, "cublasSetMathMode");
    SYM(b, cublasGemmEx, "cublasGemmEx");
    SYM(b, cublasGemmStridedBatchedEx, "cublasGemmStridedBatchedEx");
    return 0;
}

int qat_nvrtc_load(QATNvrtcAPI *api, const char *path, char *err, size_t errlen) {
    memset(api, 0, sizeof *api);
    const char *lib = "NVRTC";
    const char *names[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so", NULL};
    void *h = open_path_or_any(path, names, lib,
                               "NVRTC not found (libnvrtc.so.13 or .12): install the CUDA toolkit's NVRTC or set QAT_NVRTC", err,
                               errlen);
    if (!h) return 1;
    SYM(h, nvrtcVersion, "nvrtcVersion");
    SYM(h, nvrtcCreateProgram, "nvrtcCreateProgram");
    SYM(h, nvrtcCompileProgram, "nvrtcCompileProgram");
    SYM(h, nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize");
    SYM(h, nvrtcGetProgramLog, "nvrtcGetProgramLog");
    SYM(h, nvrtcGetCUBINSize, "nvrtcGetCUBINSize");
    SYM(h, nvrtcGetCUBIN, "nvrtcGetCUBIN");
    SYM(h, nvrtcDestroyProgram, "nvrtcDestroyProgram");
    SYM(h, nvrtcGetErrorString, "nvrtcGetErrorString");
    return 0;
}

CUresult qat_cuda_launch(const QATCudaAPI *api, CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned shmem, void **args) {
    return api->cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, NULL, args, NULL);
}

void qat_nccl_disable_nvls(void) { setenv("NCCL_NVLS_ENABLE", "0", 1); }

int qat_nccl_load(QATNcclAPI *api, const char *path, char *err, size_t errlen) {
    memset(api, 0, sizeof *api);
    qat_nccl_disable_nvls();  // before NCCL reads its environment, and inherited by children
    const char *lib = "libnccl.so.2";
    if (!(path && *path)) path = getenv("QAT_NCCL_LIB");
    const char *names[] = {"libnccl.so.2", "libnccl.so", NULL};
    void *h = open_path_or_any(path, names, "NCCL",
                               "NCCL not found (libnccl.so.2): install it (apt-get install libnccl2, or pip install "
                               "nvidia-nccl-cu13) and set QAT_NCCL_LIB to the library, or QAT_GRAD_REDUCE=mpi",
                               err, errlen);
    if (!h) return 1;
    SYM(h, ncclGetVersion, "ncclGetVersion");
    SYM(h, ncclGetUniqueId, "ncclGetUniqueId");
    SYM(h, ncclCommInitRank, "ncclCommInitRank");
    SYM(h, ncclAllReduce, "ncclAllReduce");
    SYM(h, ncclBroadcast, "ncclBroadcast");
    SYM(h, ncclCommDestroy, "ncclCommDestroy");
    SYM(h, ncclGetErrorString, "ncclGetErrorString");
    return 0;
}

ncclResult_t qat_nccl_unique_id_bytes(const QATNcclAPI *api, void *id128) {
    qat_nccl_unique_id id;
    memset(&id, 0, sizeof id);
    ncclResult_t r = api->ncclGetUniqueId(&id);
    memcpy(id128, &id, sizeof id);
    return r;
}

ncclResult_t qat_nccl_comm_init_rank(const QATNcclAPI *api, ncclComm_t *comm, int nranks, const void *id128, int rank) {
    qat_nccl_unique_id id;
    memcpy(&id, id128, sizeof id);
    return api->ncclCommInitRank(comm, nranks, id, rank);
}
