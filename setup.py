import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# vdisk._fast: the data kernels (numpy arrays in, arrays or scalars out);
# vdisk._hotpath: the Disk's pread/pwrite hot path and its lock
extensions = [
    Extension(
        f"vdisk.{name}",
        [f"vdisk/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    )
    for name in ("_fast", "_hotpath")
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
