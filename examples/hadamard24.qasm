// 24 qubits, a Hadamard on each, every qubit measured (the README's quick start runs it).
// 2**24 equally likely outcomes; Aer simulates it with the stabilizer method.
OPENQASM 2.0;
include "qelib1.inc";
qreg q[24];
creg c[24];
h q;
measure q -> c;
