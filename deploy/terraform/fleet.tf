# A regcache fleet (docs/FLEET.md, "Peers"): one machine per address of var.fleet_ips, each built
# from ../cloud-init/fleet.yaml.tftpl with the whole list in [peers] and one shared token. Growing
# the fleet is adding an address: new machines get the new list at first boot, running ones on
# `systemctl reload regcache` (or replace them). The token is in the terraform state and in the
# machines' user data; in production, fetch it from a secret store at boot instead.
variable "fleet_ips" {
  type        = list(string)
  description = "Fixed private addresses of the fleet's machines, in the fleet's subnet"
}
variable "fleet_cidr" {
  type        = string
  description = "The network the fleet's machines talk to each other on (access.allow)"
}
variable "fleet_subnet_id" { type = string }

resource "random_password" "peer_token" {
  length  = 48
  special = false
}

locals {
  peer_urls = [for ip in var.fleet_ips : "http://${ip}:5000"]
}

resource "aws_instance" "regcache_node" {
  count         = length(var.fleet_ips)
  ami           = var.ami
  instance_type = var.instance_type
  subnet_id     = var.fleet_subnet_id
  private_ip    = var.fleet_ips[count.index]
  user_data = templatefile("${path.module}/../cloud-init/fleet.yaml.tftpl", {
    peer_urls  = jsonencode(local.peer_urls)
    peer_token = random_password.peer_token.result
    fleet_cidr = var.fleet_cidr
  })

  root_block_device {
    # regcache's data lives on the persistent root volume (/var/lib/regcache).
    volume_size = 100
    volume_type = "gp3"
  }
}
