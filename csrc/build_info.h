#pragma once
// Largest M + N the CUDA exact-EMD kernel solves on the device; larger problems are solved by
// the CPU kernel (with a warning from Python). One thread per problem: beyond this size a
// single GPU thread is slower than a CPU core.
#ifndef BERT_EMD_CUDA_MAX_NODES
#define BERT_EMD_CUDA_MAX_NODES 256
#endif
