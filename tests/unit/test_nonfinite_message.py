"""The words of a non-finite step's message (train/nonfinite.py NonFinite, format_ranks): which ranks it names and
where it says the NaN arose. The whole path, through the launcher, is tests/dist/test_nonfinite.py."""

from train.nonfinite import NonFinite, format_ranks as _ranks


def test_ranks_are_written_as_runs():
    assert _ranks([3]) == "rank 3"
    assert _ranks([0, 1, 2, 3, 8]) == "ranks 0-3, 8"
    assert _ranks([1, 3, 4, 6]) == "ranks 1, 3-4, 6"


def test_the_loss_names_the_origin_before_the_gradients_it_spread_to():
    # a forward's NaN on ranks 4-5 reaches other ranks' gradients through the experts' exchange before the
    # data-parallel reduction: the ranks whose loss was not finite are where to look
    bad = NonFinite(grads=["the language model's"], loss_ranks=[4, 5], grad_ranks=[0, 1, 4, 5])
    assert bad.origin == [4, 5]
    assert bad.where() == ("before their reduction over ranks, the loss on ranks 4-5 and the gradients on ranks 0-1, "
                           "4-5 were not finite")
    # every loss finite: the ranks whose own gradients were not (a backward that overflowed)
    backward = NonFinite(grads=["the language model's"], loss_ranks=[], grad_ranks=[2])
    assert backward.origin == [2]
    assert backward.where() == "before their reduction over ranks, the gradients on rank 2 were not finite"
    late = NonFinite(grads=["the vision tower's"], loss_ranks=[], grad_ranks=[])
    assert late and late.origin == []
    assert late.where().endswith("every rank's loss and gradients were finite: it arose in the reduction or after it")
    assert not NonFinite(grads=[], loss_ranks=[], grad_ranks=[])


def test_a_run_over_several_hosts_names_the_host_of_the_ranks_where_it_arose():
    """A NaN that arises on the gradients of every rank of one node points at that node's hardware: the message
    named the ranks alone ("the gradients on ranks 2-3"), and which node holds them depends on the rendezvous. On one
    host the message stays as it was."""
    hosts = ["node-a", "node-a", "node-b", "node-b"]
    bad = NonFinite(grads=["the language model's"], loss_ranks=[], grad_ranks=[2, 3])
    assert bad.where(hosts) == ("before their reduction over ranks, the gradients on ranks 2-3 (host node-b) were not "
                                "finite")
    spread = NonFinite(grads=["the language model's"], loss_ranks=[1, 2], grad_ranks=[1, 2])
    assert "the loss on ranks 1-2 (hosts node-a, node-b)" in spread.where(hosts)
    alone = "before their reduction over ranks, the gradients on ranks 2-3 were not finite"
    assert bad.where(["vm"] * 4) == bad.where() == alone
