"""`ansible-playbook playbooks/site.yml --check --diff` over SSH, pipelining off, on the converged
VMs changes nothing and fails nowhere."""

from helpers import check_site_changes_nothing

testinfra_hosts = ["ansible://kafka"]


def test_check_mode_on_the_converged_vms_changes_nothing(host):
    check_site_changes_nothing(host, expected_hosts=5)
