/**
 * The GitLab Runner custom executor: settings from its INI files and the runner's environment, the
 * config/prepare/run/cleanup stages, SSH into job VMs.
 *
 * Private to this folder (not re-exported): `ssh.ts`.
 *
 * @module
 */

export * from "./stages.ts";
