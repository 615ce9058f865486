# The ExecuTorch runtime as an interface target `edgemole_executorch`.
#
# Works with the pinned wheel (EXECUTORCH_ROOT = <site-packages>/executorch, found from `python3` when unset) and
# with a cross sysroot laid out the same way (the aarch64 wheel unpacked, an Android runtime build). The kernel
# and XNNPACK libraries only register operators and the backend from static constructors, so they are linked
# with --no-as-needed: without them a program fails to load ("Backend XnnpackBackend is not registered").
if(NOT EXECUTORCH_ROOT)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import executorch, os; print(list(executorch.__path__)[0])"
    OUTPUT_VARIABLE EXECUTORCH_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _et_rc)
  if(NOT _et_rc EQUAL 0 OR NOT EXECUTORCH_ROOT)
    message(FATAL_ERROR "cannot find the executorch package: pip install executorch==1.5.1, or set EXECUTORCH_ROOT")
  endif()
endif()
set(EXECUTORCH_ROOT "${EXECUTORCH_ROOT}" CACHE PATH "executorch package folder" FORCE)
set(_et_lib "${EXECUTORCH_ROOT}/lib")
foreach(_lib executorch executorch_threadpool executorch_kernels_optimized executorch_backend_xnnpack)
  if(NOT EXISTS "${_et_lib}/lib${_lib}.so")
    message(FATAL_ERROR "${_et_lib}/lib${_lib}.so is missing (EXECUTORCH_ROOT=${EXECUTORCH_ROOT})")
  endif()
endforeach()

add_library(edgemole_executorch INTERFACE)
target_include_directories(edgemole_executorch SYSTEM INTERFACE
  "${EXECUTORCH_ROOT}/include"
  "${EXECUTORCH_ROOT}/include/executorch/runtime/core/portable_type/c10")
target_compile_definitions(edgemole_executorch INTERFACE C10_USING_CUSTOM_GENERATED_MACROS ET_EVENT_TRACER_ENABLED)
target_link_libraries(edgemole_executorch INTERFACE
  "${_et_lib}/libexecutorch.so"
  "${_et_lib}/libexecutorch_threadpool.so"
  "-Wl,--no-as-needed"
  "${_et_lib}/libexecutorch_kernels_optimized.so"
  "${_et_lib}/libexecutorch_backend_xnnpack.so"
  "-Wl,--as-needed"
  "-Wl,-rpath,${_et_lib}")
