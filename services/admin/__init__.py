"""Model administration: AdminService (served next to the policy and reward services) and its CLI."""
