# A configuration that needs no provider download: terraform_data is built in.
variable "greeting" {
  type    = string
  default = "hello from terraform"
}

resource "terraform_data" "greeting" {
  input = var.greeting
}

output "greeting" {
  value = terraform_data.greeting.output
}
