# Machines are built with regcache in place, never patched live: the cloud-init document below
# installs the binary, its config and systemd unit at first boot. Change it and replace machines.
variable "ami" { type = string }
variable "instance_type" { default = "t3.medium" }

resource "aws_launch_template" "node" {
  name_prefix   = "node-"
  image_id      = var.ami
  instance_type = var.instance_type
  user_data     = base64encode(file("${path.module}/../cloud-init/regcache.yaml"))

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      # regcache's data lives on the persistent root volume (/var/lib/regcache).
      volume_size = 100
      volume_type = "gp3"
    }
  }
}
