set -u
. bench/device_env.sh
G="tests/test_gpu_ipc.py::test_cuda_graph_capture"
stamp "stress: graph tests x10, current"
for i in 1 2 3 4 5 6 7 8 9 10; do timeout -k 5 60 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT $G tests/test_gpu_ipc.py::test_repeated_calls_changing_data 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -a "passed\|failed" | tail -1; done
stamp "racecheck current, PDL on"
timeout -k 5 120 $M -n 4 compute-sanitizer --tool racecheck python3 -m mpi4py tests/run_mpi.py $PT $G > $OUT/rc_cur.log 2>&1; echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' $OUT/rc_cur.log | grep -a "FAILED\|passed\|SUMMARY\|assert .* ==" | sort | uniq -c
stamp "racecheck current, PDL off"
PYA2A_IPC_PDL=0 timeout -k 5 120 $M -n 4 -x PYA2A_IPC_PDL compute-sanitizer --tool racecheck python3 -m mpi4py tests/run_mpi.py $PT $G > $OUT/rc_cur_nopdl.log 2>&1; echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' $OUT/rc_cur_nopdl.log | grep -a "FAILED\|passed\|SUMMARY\|assert .* ==" | sort | uniq -c
stamp "old (session 3) code"
rm -rf /tmp/old && cp -r . /tmp/old && cp old_s3/pya2a/gpu/ipc_alltoallv.py /tmp/old/pya2a/gpu/ && cp old_s3/pya2a/gpu/kernels/ipc_alltoallv.cu /tmp/old/pya2a/gpu/kernels/ && cd /tmp/old && export PYTHONPATH=/tmp/site:/tmp/old
timeout -k 5 120 $M -n 4 -x PYTHONPATH compute-sanitizer --tool racecheck python3 -m mpi4py tests/run_mpi.py $PT $G > $OUT/rc_old.log 2>&1; echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' $OUT/rc_old.log | grep -a "FAILED\|passed\|SUMMARY\|assert .* ==" | sort | uniq -c
stamp done
