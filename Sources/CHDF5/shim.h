#include <hdf5.h>

/* HDF5's native type ids and property-list defaults are macros over globals that
   H5open() initialises; Swift cannot import them, so expose them as functions. */
static inline hid_t qat_h5t_native_int32(void) { return H5T_NATIVE_INT32; }
static inline hid_t qat_h5t_native_int64(void) { return H5T_NATIVE_INT64; }
static inline hid_t qat_h5t_native_float(void) { return H5T_NATIVE_FLOAT; }
static inline hid_t qat_h5t_native_uint8(void) { return H5T_NATIVE_UINT8; }
static inline hid_t qat_h5p_default(void) { return H5P_DEFAULT; }
static inline hid_t qat_h5s_all(void) { return H5S_ALL; }
static inline hid_t qat_h5p_dataset_create(void) { return H5P_DATASET_CREATE; }
static inline hid_t qat_h5p_link_create(void) { return H5P_LINK_CREATE; }
static inline unsigned qat_h5f_acc_rdonly(void) { return H5F_ACC_RDONLY; }
static inline unsigned qat_h5f_acc_trunc(void) { return H5F_ACC_TRUNC; }
static inline unsigned qat_h5f_acc_rdwr(void) { return H5F_ACC_RDWR; }
