# Helpers for CMakeLists.txt: reading values from the running Python, build settings,
# CUDA architecture lists, and the per-instruction-set CPU kernel objects.

# shammie_python_value(VAR code): VAR = stripped stdout of `python -c code`; fails loudly.
function(shammie_python_value var code)
  execute_process(COMMAND "${Python_EXECUTABLE}" -c "${code}"
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "shammie: `${Python_EXECUTABLE} -c \"${code}\"` failed:\n${err}")
  endif()
  set(${var} "${out}" PARENT_SCOPE)
endfunction()

# shammie_setting(VAR default): a -DVAR=..., else the environment variable VAR, else default.
function(shammie_setting var default)
  if(DEFINED ${var})
    set(value "${${var}}")
  elseif(DEFINED ENV{${var}})
    set(value "$ENV{${var}}")
  else()
    set(value "${default}")
  endif()
  set(${var} "${value}" PARENT_SCOPE)
endfunction()

# shammie_cuda_architectures(OUT): CMake architectures ("80;90") from CMAKE_CUDA_ARCHITECTURES or
# TORCH_CUDA_ARCH_LIST ("8.0;9.0", "9.0a", "8.0 9.0+PTX"); default 8.0 and 9.0.
# Also sets SHAMMIE_TORCH_ARCH_LIST, the same list in torch's spelling.
function(shammie_cuda_architectures out)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(archs ${CMAKE_CUDA_ARCHITECTURES})
    set(torch_list "")
    foreach(a IN LISTS archs)
      string(REGEX REPLACE "-(real|virtual)$" "" a "${a}")
      string(REGEX REPLACE "^([0-9]+)([0-9])([a-z]?)$" "\\1.\\2\\3" t "${a}")
      list(APPEND torch_list "${t}")
    endforeach()
  else()
    shammie_setting(TORCH_CUDA_ARCH_LIST "8.0;9.0")
    string(REPLACE " " ";" torch_list "${TORCH_CUDA_ARCH_LIST}")
    set(archs "")
    foreach(t IN LISTS torch_list)
      string(REPLACE "+PTX" "" t "${t}")
      if(NOT t MATCHES "^[0-9]+\\.[0-9][a-z]?$")
        message(FATAL_ERROR "shammie: TORCH_CUDA_ARCH_LIST entry '${t}' is not of the form 8.0, 9.0 or 9.0a")
      endif()
      string(REPLACE "." "" a "${t}")
      list(APPEND archs "${a}")
    endforeach()
  endif()
  list(REMOVE_DUPLICATES archs)
  string(REPLACE ";" " " torch_list "${torch_list}")
  set(${out} "${archs}" PARENT_SCOPE)
  set(SHAMMIE_TORCH_ARCH_LIST "${torch_list}" PARENT_SCOPE)
endfunction()

# shammie_torch_target(target): compile and link a target against libtorch with torch's ABI.
function(shammie_torch_target target)
  target_link_libraries(${target} PRIVATE ${TORCH_LIBRARIES})
  target_include_directories(${target} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc"
                                               "${CMAKE_CURRENT_BINARY_DIR}/generated")
  target_compile_definitions(${target} PRIVATE _GLIBCXX_USE_CXX11_ABI=${SHAMMIE_TORCH_ABI})
endfunction()

# shammie_add_cpu_kernels(target sources): compiles `sources` once per instruction set and links
# the objects into `target`. Each copy gets SHAMMIE_CPU_ISA=<name> so that its symbols live in
# their own namespace, and SHAMMIE_CPU_ISA_TARGET for SHAMMIE_CPU_TARGET_BEGIN (common/cpu_isa.h);
# cpu_isa() picks one at run time.
function(shammie_add_cpu_kernels target sources)
  set(isas base)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    list(APPEND isas avx2 avx512)
    set(target_avx2 "avx2,fma,f16c")
    set(target_avx512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
  endif()
  # at::parallel_for is inline around `#pragma omp parallel`: without OpenMP it runs on one
  # thread. Link by flag, not by path: libgomp.so.1 then resolves at run time to the copy torch
  # has already loaded, so there is one OpenMP runtime and torch.set_num_threads applies to us.
  find_package(OpenMP REQUIRED COMPONENTS CXX)
  target_link_options(${target} PRIVATE ${OpenMP_CXX_FLAGS})
  foreach(isa IN LISTS isas)
    set(obj ${target}_cpu_${isa})
    add_library(${obj} OBJECT ${sources})
    set_target_properties(${obj} PROPERTIES POSITION_INDEPENDENT_CODE ON CXX_VISIBILITY_PRESET hidden)
    # Same flags for every copy: the instruction set is applied with `#pragma GCC target` after
    # the includes, so inline functions from torch's headers are never built for a wider ISA.
    target_compile_definitions(${obj} PRIVATE SHAMMIE_CPU_ISA=${isa})
    if(target_${isa})
      target_compile_definitions(${obj} PRIVATE SHAMMIE_CPU_ISA_TARGET="${target_${isa}}")
    endif()
    # -fno-trapping-math -fno-math-errno (as torch builds): no results change, but compares
    # if-convert into vector selects (common/fast_math.h) and math calls need not set errno.
    target_compile_options(${obj} PRIVATE -O3 -fopenmp-simd -fno-trapping-math -fno-math-errno)
    shammie_torch_target(${obj})
    target_compile_options(${obj} PRIVATE ${OpenMP_CXX_FLAGS})
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${obj}>)
    string(TOUPPER ${isa} ISA)
    target_compile_definitions(${target} PRIVATE SHAMMIE_HAS_CPU_${ISA}=1)
  endforeach()
endfunction()
