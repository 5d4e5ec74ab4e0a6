// The few CUDA driver, NVRTC and cuBLAS entry points qat uses, declared here so that building
// needs no NVIDIA header or library: everything is opened with dlopen at run time
// (`ccuda_load`), as MPI is. Types are the ABI-level ones (handles are opaque pointers,
// enums are ints), with the values of CUDA 12/13's headers.
#ifndef QAT_CCUDA_H
#define QAT_CCUDA_H
#include <stddef.h>

typedef int CUresult;            // 0 = CUDA_SUCCESS
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef void *CUstream;
typedef void *CUevent;
typedef unsigned long long CUdeviceptr;
typedef void *nvrtcProgram;
typedef int nvrtcResult;         // 0 = NVRTC_SUCCESS
typedef void *cublasHandle_t;
typedef int cublasStatus_t;      // 0 = CUBLAS_STATUS_SUCCESS

// cuDeviceGetAttribute
enum { QAT_CU_ATTR_MULTIPROCESSOR_COUNT = 16, QAT_CU_ATTR_CC_MAJOR = 75, QAT_CU_ATTR_CC_MINOR = 76 };
// cuFuncSetAttribute: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
enum { QAT_CU_FUNC_MAX_DYNAMIC_SHARED = 8 };
// cublasOperation_t, cudaDataType_t, cublasComputeType_t, cublasMath_t, cublasGemmAlgo_t
enum { QAT_CUBLAS_OP_N = 0, QAT_CUBLAS_OP_T = 1 };
enum { QAT_CUDA_R_32F = 0, QAT_CUDA_R_16BF = 14 };
enum { QAT_CUBLAS_COMPUTE_32F = 68, QAT_CUBLAS_COMPUTE_32F_PEDANTIC = 69 };
enum { QAT_CUBLAS_DEFAULT_MATH = 0, QAT_CUBLAS_PEDANTIC_MATH = 2 };
enum { QAT_CUBLAS_GEMM_DEFAULT = -1 };

typedef struct {
    // driver API (libcuda.so.1)
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuDriverGetVersion)(int *);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice);
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*cuDeviceTotalMem)(size_t *, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
    CUresult (*cuMemGetInfo)(size_t *, size_t *);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuMemcpyDtoD)(CUdeviceptr, CUdeviceptr, size_t);
    CUresult (*cuMemsetD8)(CUdeviceptr, unsigned char, size_t);
    CUresult (*cuModuleLoadData)(CUmodule *, const void *);
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               unsigned, CUstream, void **, void **);
    CUresult (*cuGetErrorString)(CUresult, const char **);
    // events (`qat bench --profile` only; null when the driver lacks them)
    CUresult (*cuEventCreate)(CUevent *, unsigned int);
    CUresult (*cuEventRecord)(CUevent, CUstream);
    CUresult (*cuEventSynchronize)(CUevent);
    CUresult (*cuEventElapsedTime)(float *, CUevent, CUevent);
    CUresult (*cuEventDestroy)(CUevent);
    // cuBLAS (libcublas.so.13 / .12)
    cublasStatus_t (*cublasCreate)(cublasHandle_t *);
    cublasStatus_t (*cublasSetMathMode)(cublasHandle_t, int);
    cublasStatus_t (*cublasGemmEx)(cublasHandle_t, int, int, int, int, int, const void *, const void *, int, int,
                                   const void *, int, int, const void *, void *, int, int, int, int);
    cublasStatus_t (*cublasGemmStridedBatchedEx)(cublasHandle_t, int, int, int, int, int, const void *,
                                                 const void *, int, int, long long, const void *, int, int, long long,
                                                 const void *, void *, int, int, long long, int, int, int);
} QATCudaAPI;

typedef struct {
    nvrtcResult (*nvrtcVersion)(int *, int *);
    nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram *, const char *, const char *, int, const char *const *,
                                      const char *const *);
    nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char *const *);
    nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t *);
    nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char *);
    nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram, size_t *);
    nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram, char *);
    nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram *);
    const char *(*nvrtcGetErrorString)(nvrtcResult);
} QATNvrtcAPI;

/// Opens libcuda.so.1 and cuBLAS into `api`. Returns 0, or 1 with a one-line reason in `err`.
int qat_cuda_load(QATCudaAPI *api, char *err, size_t errlen);
/// Opens NVRTC (`path`, or libnvrtc.so.13 / .12 by name and in the usual CUDA folders).
int qat_nvrtc_load(QATNvrtcAPI *api, const char *path, char *err, size_t errlen);
/// Launch with up to 16 kernel arguments given as pointers to their values.
CUresult qat_cuda_launch(const QATCudaAPI *api, CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned shmem, void **args);

// NCCL (libnccl.so.2): the collectives of data-parallel training on several GPUs. ncclUniqueId
// is 128 opaque bytes (NCCL_UNIQUE_ID_BYTES); ncclDataType_t and ncclRedOp_t are ints.
typedef void *ncclComm_t;
typedef int ncclResult_t;        // 0 = ncclSuccess
enum { QAT_NCCL_UNIQUE_ID_BYTES = 128 };
typedef struct { char internal[QAT_NCCL_UNIQUE_ID_BYTES]; } qat_nccl_unique_id;
enum { QAT_NCCL_FLOAT32 = 7 };   // ncclFloat32
enum { QAT_NCCL_SUM = 0 };       // ncclSum

typedef struct {
    ncclResult_t (*ncclGetVersion)(int *);
    ncclResult_t (*ncclGetUniqueId)(qat_nccl_unique_id *);
    ncclResult_t (*ncclCommInitRank)(ncclComm_t *, int, qat_nccl_unique_id, int);
    ncclResult_t (*ncclAllReduce)(const void *, void *, size_t, int, int, ncclComm_t, CUstream);
    ncclResult_t (*ncclBroadcast)(const void *, void *, size_t, int, int, ncclComm_t, CUstream);
    ncclResult_t (*ncclCommDestroy)(ncclComm_t);
    const char *(*ncclGetErrorString)(ncclResult_t);
} QATNcclAPI;

/// Sets NCCL_NVLS_ENABLE=0 in this process's environment (overwriting any value, so that child
/// processes inherit it too): NVLink multicast stays off. Called by `qat_nccl_load` first.
void qat_nccl_disable_nvls(void);
/// Opens NCCL (`path`, else $QAT_NCCL_LIB, else libnccl.so.2 by name, in $QAT_CUDA_LIB_DIR and
/// the usual CUDA folders). Returns 0, or 1 with a one-line reason in `err`.
int qat_nccl_load(QATNcclAPI *api, const char *path, char *err, size_t errlen);
/// ncclGetUniqueId into 128 bytes (so that Swift never passes the struct by value).
ncclResult_t qat_nccl_unique_id_bytes(const QATNcclAPI *api, void *id128);
/// ncclCommInitRank with the unique id given as its 128 bytes.
ncclResult_t qat_nccl_comm_init_rank(const QATNcclAPI *api, ncclComm_t *comm, int nranks, const void *id128, int rank);
#endif
