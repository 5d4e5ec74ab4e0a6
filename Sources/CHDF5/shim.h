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

/* Added for QATData's HDF5File: error-stack default, standard (file) types with a fixed
   byte order so files written here read the same everywhere, the C string type for
   attributes, and the unlimited-extent / variable-length size sentinels. */
static inline hid_t qat_h5e_default(void) { return H5E_DEFAULT; }
static inline hid_t qat_h5t_std_i32le(void) { return H5T_STD_I32LE; }
static inline hid_t qat_h5t_std_i64le(void) { return H5T_STD_I64LE; }
static inline hid_t qat_h5t_std_u8le(void) { return H5T_STD_U8LE; }
static inline hid_t qat_h5t_std_u16le(void) { return H5T_STD_U16LE; }
static inline hid_t qat_h5t_native_uint16(void) { return H5T_NATIVE_UINT16; }
static inline hid_t qat_h5t_ieee_f32le(void) { return H5T_IEEE_F32LE; }
static inline hid_t qat_h5t_ieee_f64le(void) { return H5T_IEEE_F64LE; }
static inline hid_t qat_h5t_native_double(void) { return H5T_NATIVE_DOUBLE; }
static inline hid_t qat_h5t_c_s1(void) { return H5T_C_S1; }
static inline hid_t qat_h5p_dataset_xfer(void) { return H5P_DATASET_XFER; }
static inline hsize_t qat_h5s_unlimited(void) { return H5S_UNLIMITED; }
static inline size_t qat_h5t_variable(void) { return H5T_VARIABLE; }

/* A conversion-exception handler that makes an out-of-range integer conversion (e.g. an
   int64 token id above Int32.max read into an int32 buffer) fail the read instead of
   HDF5's default of silently saturating. */
static inline H5T_conv_ret_t qat_h5t_abort_on_range(H5T_conv_except_t kind, hid_t src, hid_t dst,
                                                    void *src_buf, void *dst_buf, void *user) {
    (void)src; (void)dst; (void)src_buf; (void)dst_buf; (void)user;
    if (kind == H5T_CONV_EXCEPT_RANGE_HI || kind == H5T_CONV_EXCEPT_RANGE_LOW) return H5T_CONV_ABORT;
    return H5T_CONV_UNHANDLED;
}
static inline herr_t qat_h5p_set_abort_on_range(hid_t dxpl) {
    return H5Pset_type_conv_cb(dxpl, qat_h5t_abort_on_range, NULL);
}

/* IEEE binary16, little-endian (HDF5 1.10 has no predefined half type; this is the type
   h5py creates for numpy float16, so such datasets read as float16 there). Never closed. */
static inline hid_t qat_h5t_ieee_f16le(void) {
    static hid_t t = -1;
    if (t < 0) {
        hid_t c = H5Tcopy(H5T_IEEE_F32LE);
        H5Tset_fields(c, 15, 10, 5, 0, 10);
        H5Tset_precision(c, 16);
        H5Tset_size(c, 2);
        H5Tset_ebias(c, 15);
        t = c;
    }
    return t;
}

/* bfloat16 (1 sign, 8 exponent, 7 mantissa bits), little-endian: float32's upper half.
   HDF5 converts it to and from native float (widening is exact). Never closed. */
static inline hid_t qat_h5t_bf16le(void) {
    static hid_t t = -1;
    if (t < 0) {
        hid_t c = H5Tcopy(H5T_IEEE_F32LE);
        H5Tset_fields(c, 15, 7, 8, 0, 7);
        H5Tset_precision(c, 16);
        H5Tset_size(c, 2);
        H5Tset_ebias(c, 127);
        t = c;
    }
    return t;
}
