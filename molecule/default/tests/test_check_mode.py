"""`ansible-playbook playbooks/site.yml --check --diff` on the converged hosts changes nothing and
fails nowhere: a dry run tells the truth about a deployment that is up to date. It runs first
(after molecule's idempotence step), before the other modules send more images."""

from helpers import check_site_changes_nothing

testinfra_hosts = ["ansible://kafka"]


def test_check_mode_on_the_converged_deployment_changes_nothing(host):
    check_site_changes_nothing(host, expected_hosts=4)
