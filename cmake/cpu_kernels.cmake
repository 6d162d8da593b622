# CPU kernels are compiled once per instruction set and picked at run time
# (cpp/src/cpu_dispatch.cpp), so one wheel runs on any x86-64 machine and still
# uses AVX2/FMA/F16C, or AVX-512, where the processor has them -- as PyTorch does.
#
# Each kernel source is compiled with ZF_CPU_ISA set to the variant's name; the
# source puts its code in namespace zerofuse::cpu::ZF_CPU_ISA.

# -fno-trapping-math lets gcc turn float selects into blends (vectorised loops);
# nothing here relies on floating-point exceptions.
set(ZEROFUSE_CPU_KERNEL_FLAGS -O3 -fno-math-errno -fno-trapping-math -fopenmp-simd -Wall -Wextra)

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set(ZEROFUSE_CPU_ISAS baseline avx2 avx512)
  set(ZEROFUSE_CPU_ISA_FLAGS_baseline "")
  set(ZEROFUSE_CPU_ISA_FLAGS_avx2 -mavx2 -mfma -mf16c)
  # Skylake-X and later (F, CD, BW, DQ, VL). gcc keeps auto-vectorised loops at
  # 256 bits unless told otherwise; the kernels here are short bursts of
  # arithmetic between memory passes, where 512-bit vectors pay.
  set(ZEROFUSE_CPU_ISA_FLAGS_avx512 -mavx2 -mfma -mf16c -mavx512f -mavx512cd -mavx512bw -mavx512dq -mavx512vl
      -mprefer-vector-width=512)
else()
  set(ZEROFUSE_CPU_ISAS baseline)
  set(ZEROFUSE_CPU_ISA_FLAGS_baseline "")
endif()

function(zerofuse_add_cpu_kernels target)
  set(_defs "")
  foreach(isa IN LISTS ZEROFUSE_CPU_ISAS)
    set(_obj ${target}_cpu_${isa})
    add_library(${_obj} OBJECT ${ARGN})
    target_compile_options(${_obj} PRIVATE ${ZEROFUSE_CPU_KERNEL_FLAGS} ${ZEROFUSE_CPU_ISA_FLAGS_${isa}})
    target_compile_definitions(${_obj} PRIVATE ZF_CPU_ISA=${isa})
    target_include_directories(${_obj} PRIVATE
      ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include ${CMAKE_CURRENT_SOURCE_DIR}/cpp ${CMAKE_CURRENT_SOURCE_DIR}/cpp/src)
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${_obj}>)
    string(TOUPPER ${isa} _up)
    list(APPEND _defs ZEROFUSE_CPU_HAS_${_up}=1)
  endforeach()
  target_compile_definitions(${target} PRIVATE ${_defs})
endfunction()
