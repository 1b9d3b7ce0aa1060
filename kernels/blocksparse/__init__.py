"""MegaBlocks-style block-sparse expert computation (arXiv 2211.15841).

topology   make_topology(group_sizes, num_rows, ffn_size=, block_size=128) -> Topology
padding    pad_rows / unpad_rows between expert-sorted rows and the block-padded layout
api        sdd, dsd, dds (differentiable, with transpose flags)
backends   BLOCKSPARSE_BACKENDS: the registry ("xla", "triton", "triton_interpret", "pallas")
products   BlockSparseKernels: the (sdd, dsd, dds) functions a backend record holds
xla        backend "xla": block gathers + batched matmuls
triton     backend "triton": the Pallas-Triton kernels and BlockSparseConfig
reference  dense masked references: sdd_reference, dsd_reference, dds_reference, to_dense, from_dense
dmoe       pad_to_blocks, dmoe_mlp (block-sparse expert MLP / GLU)
"""

from kernels.blocksparse.api import dds, dsd, sdd
from kernels.blocksparse.backends import BLOCKSPARSE_BACKENDS
from kernels.blocksparse.dmoe import PaddedRows, dmoe_mlp, pad_to_blocks
from kernels.blocksparse.padding import pad_rows, unpad_rows
from kernels.blocksparse.reference import (
    dds_reference, dsd_reference, from_dense, sdd_reference, to_dense)
from kernels.blocksparse.topology import Topology, block_mask, make_topology, num_row_blocks_bound
from kernels.blocksparse.triton import BlockSparseConfig

__all__ = [
    "BLOCKSPARSE_BACKENDS", "BlockSparseConfig", "PaddedRows", "Topology", "block_mask", "dds",
    "dds_reference", "dmoe_mlp", "dsd", "dsd_reference", "from_dense", "make_topology",
    "num_row_blocks_bound", "pad_rows", "pad_to_blocks", "sdd", "sdd_reference", "to_dense", "unpad_rows",
]
