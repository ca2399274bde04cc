/* SPDX-License-Identifier: Apache-2.0
 *
 * Stand-in libcuda.so.1 for GPU-less machines.
 *
 * The PyPI sglang-kernel wheel's shared objects link against the CUDA driver library, so
 * `import sgl_kernel` fails on a host without a driver. SGLang's CPU engine
 * (SGLANG_USE_CPU_ENGINE=1) imports a few names from sgl_kernel at module level but never calls a
 * CUDA op on a non-AMX CPU. This library satisfies the loader: every driver entry point the wheel
 * binds returns CUDA_ERROR_NO_DEVICE (100), so torch and everything else still see no GPU.
 *
 * Build: gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o libcuda.so.1 libcuda_stub.c
 * Never put it on LD_LIBRARY_PATH of a machine that has a real driver.
 */
#define NO_DEVICE 100
#define STUB(name) int name(void) { return NO_DEVICE; }

static const char kMessage[] = "no CUDA device (sphkv stand-in libcuda.so.1)";

STUB(cuInit)
STUB(cuDriverGetVersion)
STUB(cuDeviceGetCount)
STUB(cuGetProcAddress)
STUB(cuGetProcAddress_v2)
STUB(cuPointerGetAttribute)
STUB(cuCtxFromGreenCtx)
STUB(cuCtxPopCurrent_v2)
STUB(cuCtxPushCurrent_v2)
STUB(cuDevResourceGenerateDesc)
STUB(cuDevSmResourceSplitByCount)
STUB(cuDeviceGetDevResource)
STUB(cuGreenCtxCreate)
STUB(cuGreenCtxDestroy)
STUB(cuGreenCtxGetDevResource)
STUB(cuStreamCreate)

int cuGetErrorString(int error, const char **str) {
    (void)error;
    if (str) *str = kMessage;
    return 0;
}
